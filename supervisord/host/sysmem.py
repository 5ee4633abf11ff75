"""System memory in the shape the logs and the guide's scripts use."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psutil

from supervisord.core.units import to_mb


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
