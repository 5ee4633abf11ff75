"""Reaping the orphans the daemon inherits as a child subreaper (its agents' escapees).

Never ``waitpid(-1)``: it would steal the exit status of agents, which are reaped through
their pidfds (``launcher.wait_exit``). Orphans are reaped by pid, once seen as zombies.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from contextlib import suppress

import anyio

from supervisord.host import procfs


def zombie_children(exclude: set[int]) -> list[int]:
    """Our own dead children, but for ``exclude`` (the agents themselves)."""
    zombies = []
    for pid in procfs.children_of(os.getpid()):
        if pid not in exclude and (entry := procfs.read_entry(pid)) is not None and entry.zombie:
            zombies.append(pid)
    return zombies


def reap(pids: Iterable[int]) -> None:
    for pid in pids:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


async def reap_on_sigchld(agent_pids: Callable[[], set[int]]) -> None:
    """Reap orphans as they die, not only when the next /proc scan shows them."""
    with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
        async for _ in signals:
            reap(zombie_children(agent_pids()))
