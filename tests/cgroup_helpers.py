"""Cgroup operations only the tests need: placing a process by path, emptying a group."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence

from supervisord.host.cgroup.base import SHIM_FAILED_EXIT, AgentCgroup

# Join the group by writing our own pid to its cgroup.procs ($0), then become the command.
_SHIM_BY_PATH = f'echo $$ >"$0" || exit {SHIM_FAILED_EXIT}; exec "$@"'


def shim_command(group: AgentCgroup, command: Sequence[str]) -> list[str]:
    """``command`` behind a shim that joins ``group`` with the process's own credentials."""
    return ["/bin/sh", "-c", _SHIM_BY_PATH, str(group.path / "cgroup.procs"), *command]


def kill_group(group: AgentCgroup, timeout_s: float = 2.0) -> bool:
    """SIGKILL every member, again while forks race us, until the group is empty."""
    deadline = time.monotonic() + timeout_s
    while True:
        group.signal_all(signal.SIGKILL)
        if group.empty():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
