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


def quiet_wakeup_fd() -> None:
    """Let the event loop's signal wakeup buffer fill without a word.

    A thousand processes of one agent dying at once deliver a thousand SIGCHLDs, each a byte
    written to that buffer before the loop reads any: once it is full, CPython prints a
    traceback to stderr for every further signal (100 KB for 1,000 sleeps, which blocked a
    daemon whose stderr was a pipe nobody read). The bytes lost then are SIGCHLDs already
    queued: the reaper scans for every zombie at the first one it is woken for.
    """
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)


async def reap_on_sigchld(agent_pids: Callable[[], set[int]]) -> None:
    """Reap orphans as they die, not only when the next /proc scan shows them."""
    with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
        quiet_wakeup_fd()
        async for _ in signals:
            reap(zombie_children(agent_pids()))
