"""Cgroup operations only the tests need: placing a process by path, emptying a group."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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


V1_MEMORY = Path("/sys/fs/cgroup/memory")
# Run a command inside a group, by path ($0), from its first instruction.
JOIN_THEN_EXEC = 'echo $$ >"$0" && exec "$@"'


def own_v1_group() -> Path | None:
    """This process's cgroup v1 memory group (None without the v1 memory controller)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_MEMORY / path.lstrip("/")
    return None


@contextmanager
def limited_v1_group(name: str, limit_mb: int) -> Iterator[Path]:
    """A memory group of ours limited to ``limit_mb``, like a container's; on exit whatever
    still runs in it (or in groups a daemon made inside it) is killed and the groups go."""
    own = own_v1_group()
    if own is None or not (own / "cgroup.procs").exists():
        raise LookupError("no cgroup v1 memory group of our own to make a limited one in")
    group = own / name
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit_mb * 2**20))
    try:
        yield group
    finally:
        groups = sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for each in [*groups, group]:
            for pid in (each / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.1)
        for each in [*groups, group]:
            each.rmdir()
