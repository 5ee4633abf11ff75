"""Memory pressure stall information (PSI): the share of time tasks waited for memory."""

from __future__ import annotations

from pathlib import Path

SYSTEM_PSI = Path("/proc/pressure/memory")


def some_avg10(path: Path = SYSTEM_PSI) -> float | None:
    """The ``some avg10`` percentage of ``path`` (the system's, or a v2 cgroup's
    ``memory.pressure``); None where the kernel has no PSI."""
    try:
        text = path.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            for word in line.split()[1:]:
                key, _, value = word.partition("=")
                if key == "avg10":
                    return float(value)
    return None
