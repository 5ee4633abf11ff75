"""Units of memory: one MiB, and conversions where figures change unit."""

from __future__ import annotations

MIB = 1024 * 1024


def to_mb(n_bytes: float) -> float:
    """Bytes as MiB, to one decimal (the figure the logs and the guide show)."""
    return round(n_bytes / MIB, 1)


def mb_to_bytes(mb: float) -> int:
    return int(mb * MIB)
