"""What ``claude-pm watch PID`` needs to know of a running process before adopting its tree.

Identity is the pid and its start time (a pid reused later is not the same agent); whose it
is comes from the real uid in ``/proc/PID/status``; a kernel thread (``PF_KTHREAD``) has no
memory of its own to supervise and is refused.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import IO

from supervisord.core.errors import NotFoundError, UsageError
from supervisord.host import procfs

PF_KTHREAD = 0x00200000
_TYPE_CHARS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True, slots=True)
class Target:
    pid: int
    start: int
    uid: int
    command: tuple[str, ...]
    comm: str


def look(pid: int) -> Target:
    """The process ``pid`` as ``watch`` takes it; a clear error when it cannot be."""
    if pid <= 0:
        raise UsageError(f"watch: pid must be a positive process id, got {pid}")
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            status = f.read()
    except OSError:
        raise NotFoundError(f"watch: no process {pid}") from None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2 :].split()
    if int(rest[6]) & PF_KTHREAD:
        raise UsageError(f"watch: pid {pid} ({comm}) is a kernel thread, not an agent")
    if rest[0] in ("Z", "X"):
        raise NotFoundError(f"watch: process {pid} ({comm}) has ended")
    if pid == os.getpid() or pid == 1:
        raise UsageError(f"watch: pid {pid} ({comm}) is not an agent the daemon may adopt")
    uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
    return Target(pid, int(rest[19]), uid, tuple(procfs.cmdline(pid)) or (comm,), comm)


def agent_type_of(target: Target) -> str:
    return type_from_command(target.command or (target.comm,))


def type_from_command(command: tuple[str, ...] | list[str]) -> str:
    """The command's basename, made a valid agent type (``claude``, ``node``, ``agent-7z``)."""
    name = _TYPE_CHARS.sub("-", os.path.basename(command[0]).lower()).strip("-")
    return name if name[:1].isalpha() else f"agent-{name}".rstrip("-")


def open_stderr(pid: int, owner_uid: int) -> IO[str] | None:
    """The process's own stderr, for the daemon's one line when it ends the agent (the
    terminal a `claude-pm run` was typed in). None when it cannot be, or may not be, used.

    Opening ``/proc/PID/fd/2`` opens the file anew with the daemon's rights, not the mode the
    process holds it in: a root daemon must not write (or truncate) a file that a user only
    holds open for reading. So only a terminal, pipe or socket that ``owner_uid`` owns and may
    write qualifies (for root, any of those kinds); never a regular file. Appending and
    non-blocking: a full pipe never stalls the daemon.
    """
    path = f"/proc/{pid}/fd/2"
    try:
        st = os.stat(path)
    except OSError:
        return None
    kind_ok = stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)
    owned = owner_uid == 0 or (st.st_uid == owner_uid and bool(st.st_mode & stat.S_IWUSR))
    if not (kind_ok and owned):
        return None
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    return os.fdopen(fd, "w", encoding="utf-8", errors="replace")
