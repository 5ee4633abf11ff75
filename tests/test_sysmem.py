"""Available memory as admission and shedding read it (host/sysmem)."""

from __future__ import annotations

import psutil
import pytest

from supervisord.host import sysmem
from supervisord.host.sysmem import RecentAvailable, available_mb


def test_available_memory_agrees_with_psutil() -> None:
    ours, theirs = available_mb(), psutil.virtual_memory().available / 2**20
    # Read a moment apart on a live machine: within 1% (or 64 MB), not equal.
    assert abs(ours - theirs) <= max(64.0, 0.01 * theirs), (ours, theirs)


def test_recent_available_reads_again_only_once_it_is_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The file's figures are stood in for: what is tested is when it is read again.
    reads = iter([1000.0, 900.0, 800.0])
    monkeypatch.setattr(sysmem, "available_mb", lambda: next(reads))
    now = [10.0]
    recent = RecentAvailable(max_age_s=0.1, clock=lambda: now[0])
    seen = []
    for at in (10.0, 10.05, 10.2, 10.25, 11.0):
        now[0] = at
        seen.append(recent())
    assert seen == [1000.0, 1000.0, 900.0, 900.0, 800.0]
