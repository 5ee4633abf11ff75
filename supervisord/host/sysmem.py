"""System memory in the shape the logs and the guide's scripts use."""

from __future__ import annotations

import time
from collections.abc import Callable
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


def available_mb() -> float:
    """MemAvailable alone, from one read of /proc/meminfo (psutil where there is none)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            data = f.read()
        at = data.index(b"MemAvailable:") + len(b"MemAvailable:")
        return to_mb(int(data[at : data.index(b"kB", at)]) * 1024)
    except (OSError, ValueError):
        return system_memory().available_mb


class RecentAvailable:
    """``available_mb()`` at most ``max_age_s`` old.

    Admission and shedding look at it after every turn of the loop, hundreds of times a
    second while agents are launched, and reading /proc/meminfo then cost up to 0.7 ms a
    read in a profile of 200 launches. A tenth of a second is far below the sample interval
    that matters for memory others use; what the agents use is counted from their samples.
    """

    def __init__(self, max_age_s: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.max_age_s = max_age_s
        self._clock = clock
        self._at = float("-inf")
        self._mb = 0.0

    def __call__(self) -> float:
        now = self._clock()
        if now - self._at >= self.max_age_s:
            self._mb, self._at = available_mb(), now
        return self._mb


def enclosing_mb() -> float | None:
    """The memory limit around the daemon (its cgroup's or an ancestor's), in MB."""
    limit = enclosing_limit_bytes()
    return None if limit is None else to_mb(limit)


def shared_total_mb() -> float:
    """What agents could share at most: MemTotal, or the daemon's enclosing cgroup limit
    where that is smaller (a container, a systemd slice with MemoryMax)."""
    total = to_mb(psutil.virtual_memory().total)
    limit = enclosing_limit_bytes()
    return total if limit is None else min(total, to_mb(limit))
