"""Signals that reach only the processes of a tree.

Every pid is opened as a pidfd and its start time checked before the signal goes through
the pidfd, so a pid that was reused by a stranger between the scan and the signal is never
touched (and the pidfd pins the process we checked until we close it).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from contextlib import suppress

from supervisord.core.identity import Identity
from supervisord.host import procfs
from supervisord.host.cgroup.base import AgentCgroup

HAS_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def signal_identity(pid: int, start: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``start``."""
    if not HAS_PIDFD:
        # Without pidfds the window between the check and kill() cannot be closed, only narrowed.
        if procfs.start_time(pid) != start:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if procfs.start_time(pid) != start:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def signal_pidfd(pidfd: int, sig: signal.Signals) -> bool:
    """Signal a process we hold a pidfd for (the agent's own process)."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except (ProcessLookupError, OSError):
        return False
    return True


def signal_tree(members: Iterable[Identity], sig: signal.Signals) -> list[int]:
    """Signal every member; returns the pids that were signalled."""
    return [pid for pid, start in members if signal_identity(pid, start, sig)]


def signal_agent(
    pidfd: int,
    pid: int,
    members: Iterable[Identity],
    sig: signal.Signals,
    cgroup: AgentCgroup | None = None,
) -> list[int]:
    """Signal an agent's whole tree: its own process through the pidfd we hold, every known
    member by identity, and (under a cgroup) members no scan has seen yet, forked a moment
    ago. Returns the pids that were signalled."""
    sent: list[int] = []
    if pidfd >= 0 and signal_pidfd(pidfd, sig):
        sent.append(pid)
    sent += signal_tree((m for m in members if m[0] != pid), sig)
    if cgroup is not None:
        with suppress(OSError):
            sent += [p for p in cgroup.signal_all(sig) if p not in sent]
    return sent
