"""An independent observer of one process tree: its RSS every 10 ms, and when it is gone.

It runs as a process of its own (``python -m bench.observer``), so neither supervisor's
scheduling nor the bench's own work delays it. Requests come on stdin, one JSON object a
line: ``{"pid": 123, "limit_mb": 1024, "timeout_s": 30, "kill_above_mb": 4608}``; the answer
is one JSON line once the tree is gone:

- ``t_cross``: when the tree's RSS (sum of exact ``statm`` RSS, MiB) first rose above
  ``limit_mb``, interpolated between the two samples around it;
- ``t_gone``: when the last process of the tree exited, from a pidfd per process, so it is
  exact rather than rounded up to the next sample;
- ``peak_mb``, ``rate_mb_s`` (the growth the leaker achieved below the limit), the last
  sample of the live tree, the sample count and the longest gap between samples (the
  observer's own fidelity).

Every time is ``time.time()``: the same clock as the ``ts`` of the daemon's records and of
supervisord's log. Members are found through ``/proc/PID/task/TID/children`` and kept once
seen, so a child orphaned when its parent dies first is still counted. As a safety net the
observer SIGKILLs the tree (through its pidfds, never a reused pid) when it outgrows
``kill_above_mb`` or outlives ``timeout_s``: no supervisor under test can leave a leaker
eating the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.common import ObserverProcess

INTERVAL_S = 0.01
MIB = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Member:
    pid: int
    start: int
    pidfd: int
    exited_at: float | None = None


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def rss_bytes(pid: int) -> int:
    """Exact resident bytes from statm; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(word) for word in f.read().split()]
        except OSError:
            continue
    return found


class Tree:
    def __init__(self, root: int) -> None:
        self.members: dict[int, Member] = {}
        self.poller = select.poll()
        self.add(root)

    def add(self, pid: int) -> None:
        # The pidfd first, then the start time: if the pid was reused in between, the start
        # time tells, and a pidfd held from here on can never signal someone else.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            os.close(pidfd)
            return
        self.members[pid] = Member(pid, stat[1], pidfd)
        self.poller.register(pidfd, select.POLLIN)

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.exited_at is None]

    def discover(self) -> None:
        for member in self.alive():
            for child in _children(member.pid):
                if child not in self.members:
                    self.add(child)

    def rss_mb(self) -> float:
        return sum(rss_bytes(m.pid) for m in self.alive()) / MIB

    def wait(self, timeout_s: float) -> None:
        """Sleep until the next sample, waking at once to note the exit of any member."""
        for fd, _ in self.poller.poll(max(0.0, timeout_s) * 1000):
            now = time.time()
            for member in self.members.values():
                if member.pidfd == fd and member.exited_at is None:
                    member.exited_at = now
                    self.poller.unregister(fd)

    def kill(self) -> None:
        for member in self.alive():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(member.pidfd, signal.SIGKILL)

    def close(self) -> None:
        for member in self.members.values():
            with contextlib.suppress(OSError):
                os.close(member.pidfd)


def observe(pid: int, limit_mb: float, timeout_s: float, kill_above_mb: float) -> dict[str, Any]:
    tree = Tree(pid)
    t_first = time.time()
    deadline = time.monotonic() + timeout_s
    samples, peak_mb, max_gap = 0, 0.0, 0.0
    prev: tuple[float, float] | None = None
    last: tuple[float, float] | None = None
    t_cross: float | None = None
    rate_from: tuple[float, float] | None = None
    rate_to: tuple[float, float] | None = None
    killed: str | None = None
    next_sample = time.monotonic()
    try:
        while tree.alive():
            now = time.time()
            tree.discover()
            mb = tree.rss_mb()
            samples += 1
            if prev is not None:
                max_gap = max(max_gap, now - prev[0])
            peak_mb = max(peak_mb, mb)
            if t_cross is None:
                if mb > limit_mb:
                    t_cross = now
                    if prev is not None and mb > prev[1]:
                        t_cross = prev[0] + (limit_mb - prev[1]) / (mb - prev[1]) * (now - prev[0])
                elif rate_to is None or mb > rate_to[1]:
                    # Growth only: once a kill starts the sum falls, and that is no growth rate.
                    if rate_from is None and mb >= 0.25 * limit_mb:
                        rate_from = (now, mb)
                    rate_to = (now, mb)
            if killed is None and mb > kill_above_mb:
                killed = f"outgrew {kill_above_mb:g} MB"
            if killed is None and time.monotonic() > deadline:
                killed = f"still alive after {timeout_s:g} s"
            if killed is not None:
                tree.kill()
            if mb > 0:
                last = (now, mb)
            prev = (now, mb)
            next_sample += INTERVAL_S
            if next_sample < time.monotonic():
                next_sample = time.monotonic()
            tree.wait(next_sample - time.monotonic())
        exits = [m.exited_at for m in tree.members.values() if m.exited_at is not None]
    finally:
        tree.close()
    rate = None
    if rate_from is not None and rate_to is not None and rate_to[0] > rate_from[0]:
        rate = (rate_to[1] - rate_from[1]) / (rate_to[0] - rate_from[0])
    return {
        "pid": pid,
        "pids": sorted(tree.members),
        "t_first": t_first,
        "t_cross": t_cross,
        "t_gone": max(exits) if exits else None,
        "peak_mb": round(peak_mb, 1),
        "last_sample": last,
        "rate_mb_s": None if rate is None else round(rate, 1),
        "samples": samples,
        "max_gap_ms": round(max_gap * 1000, 1),
        "killed_by_observer": killed,
    }


def main() -> int:
    with contextlib.suppress(OSError):
        os.nice(-10)  # As root: fewer missed samples while a leaker and a supervisor run.
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        result = observe(
            int(req["pid"]),
            float(req["limit_mb"]),
            float(req["timeout_s"]),
            float(req["kill_above_mb"]),
        )
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


class Observer(ObserverProcess):
    """The bench's handle on an observer process."""

    def __init__(self) -> None:
        super().__init__(["-m", "bench.observer"], "observer")

    def watch(
        self, pid: int, limit_mb: float, timeout_s: float, kill_above_mb: float
    ) -> dict[str, Any]:
        """Observe the tree of ``pid`` until it is gone (blocks until then)."""
        request = {
            "pid": pid,
            "limit_mb": limit_mb,
            "timeout_s": timeout_s,
            "kill_above_mb": kill_above_mb,
        }
        return self.ask(json.dumps(request))


if __name__ == "__main__":
    raise SystemExit(main())
