"""System memory in the shape the logs and the guide's scripts use."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psutil

from supervisord.core.units import to_mb
from supervisord.host.cgroup.detect import enclosing_limit_bytes


@dataclass(frozen=True, slots=True)
class SystemMemory:
    total_mb: float
    available_mb: float
    used_mb: float
    percent: float
    free_mb: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def system_memory() -> SystemMemory:
    vm = psutil.virtual_memory()
    return SystemMemory(
        total_mb=to_mb(vm.total),
        available_mb=to_mb(vm.available),
        used_mb=to_mb(vm.total - vm.available),
        percent=round(vm.percent, 1),
        free_mb=to_mb(vm.free),
    )


def shared_total_mb() -> float:
    """What agents could share at most: MemTotal, or the daemon's enclosing cgroup limit
    where that is smaller (a container, a systemd slice with MemoryMax)."""
    total = to_mb(psutil.virtual_memory().total)
    limit = enclosing_limit_bytes()
    return total if limit is None else min(total, to_mb(limit))
