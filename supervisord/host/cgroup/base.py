"""What cgroup v1 and v2 agent groups share: file access, pid handling, the two base classes.

Every method here is a handful of syscalls on cgroupfs (microseconds): safe on the event loop
or in a worker thread. The exceptions block for a bounded time and say so (``kill``,
``remove``): call those through ``anyio.to_thread.run_sync``.

File access goes through the module-level functions ``write_file``, ``make_dir`` and
``remove_dir`` so the v2 protocol tests can run against a directory laid out like cgroupfs
(where ``mkdir`` must create the control files the kernel would) and record every write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from supervisord.core.errors import CgroupError
from supervisord.host.cgroup.memstat import pread_key, working_set

AGENT_PREFIX = "agent-"
SHIM_NAME = "claude-pm-cgroup-shim"
# The shim exits with this when it cannot join the cgroup, so the agent never runs outside it.
SHIM_FAILED_EXIT = 125
# An ``sh -c`` script: join the group by writing our own pid, then become the agent (same
# pid). fd 0 is cgroup.procs opened by the daemon; /dev/null replaces it before the agent runs, so
# the agent never holds a descriptor that could move processes into the group.
_SHIM_BY_STDIN = f'echo $$ >&0 || exit {SHIM_FAILED_EXIT}; exec "$@" </dev/null'
# The same, entering "$1" first: as the agent's user, so it must be allowed to (exit 125 if not).
_SHIM_BY_STDIN_CD = (
    f'echo $$ >&0 || exit {SHIM_FAILED_EXIT}; cd -- "$1" || exit {SHIM_FAILED_EXIT}; '
    'shift; exec "$@" </dev/null'
)
_POLL_S = 0.002
# "No limit" for set_limit: the kernel clamps it to its own maximum (v2 writes "max").
UNLIMITED = 2**63 - 1
_PROCS_CHUNK = 65536
_INOTIFY_EVENT_BYTES = 16


# -- file access (module-level seams; see the module docstring) -------------------------------


def write_file(path: Path, text: str) -> None:
    """One ``write()`` of ``text``: cgroupfs takes each write as one command."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    os.mkdir(path)


def remove_dir(path: Path) -> None:
    os.rmdir(path)


def read_text(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def read_int(path: Path) -> int:
    return int(read_text(path).split()[0])


def read_keyed(path: Path) -> dict[str, int]:
    """A flat keyed file (``memory.stat``, ``memory.events``, ``memory.oom_control``)."""
    values: dict[str, int] = {}
    for line in read_text(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def pread_int(fd: int) -> int:
    """Re-read a kept-open counter file from offset 0 (about 1 us, against 7 us for open+read)."""
    return int(os.pread(fd, 32, 0))


def drain(fd: int) -> int:
    """Consume what made an eventfd (8-byte counter) or inotify fd readable; returns the count.

    Readiness only says "something changed": re-read usage and OOM state after draining.
    """
    total = 0
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return total
        if len(data) == 8:  # An eventfd: one read returns its counter and resets it.
            return total + int.from_bytes(data, "little")
        if not data:
            return total
        total += len(data) // _INOTIFY_EVENT_BYTES  # inotify: 16-byte events (no names).


def parse_procs(text: str) -> list[int]:
    # v1's cgroup.procs may list a process twice; order is irrelevant to every caller.
    return sorted({int(word) for word in text.split()})


@dataclass(frozen=True, slots=True)
class Placement:
    """How to start a command inside an agent group when the agent runs as another user.

    Pass ``argv`` to ``subprocess.Popen`` with ``stdin=placement.stdin``, then ``close()``.
    The descriptor was opened by the daemon, so the file's permissions were checked against
    the daemon; the write itself is allowed on v1 because the shim moves only itself, and on
    v2 because Linux >= 5.16 checks the opener's credentials, not the writer's. So this works
    after ``Popen(user=...)`` dropped privileges. The agent gets ``/dev/null`` as stdin.
    """

    argv: tuple[str, ...]
    stdin: int

    def close(self) -> None:
        os.close(self.stdin)


@dataclass(frozen=True, slots=True)
class Leftovers:
    """What ``cleanup_leftovers`` found: empty groups it removed, populated ones to re-adopt."""

    removed: tuple[str, ...] = ()
    populated: tuple[str, ...] = ()


class AgentCgroup(ABC):
    """One agent's memory cgroup: its limit, its usage, its members, its end.

    Obtain one from :meth:`CgroupManager.create` or :meth:`CgroupManager.adopt`. It keeps the
    usage counter and ``memory.stat`` open (each read is one ``pread``); ``remove`` closes them.
    """

    version: ClassVar[int]
    # Name of the usage counter, opened once and re-read with pread.
    usage_file: ClassVar[str]
    # The memory.stat key of the inactive file cache, to subtract from usage (see memstat).
    inactive_file_key: ClassVar[bytes]

    def __init__(self, path: Path, subprocess_id: str, proc_path: str) -> None:
        self.path = path
        self.subprocess_id = subprocess_id
        # How /proc/PID/cgroup names this group (relative to the cgroup namespace's root).
        self.proc_path = proc_path
        self._oom_seen = False
        self._procs_path = str(path / "cgroup.procs")  # a str: no Path arithmetic per sample
        self._usage_fd = self._stat_fd = -1
        try:
            self._usage_fd = os.open(path / self.usage_file, os.O_RDONLY | os.O_CLOEXEC)
            self._stat_fd = os.open(path / "memory.stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            raise CgroupError(f"cannot open {exc.filename}: {exc.strerror}") from exc

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    # -- memory -------------------------------------------------------------------------------

    def usage_bytes(self) -> int:
        """Bytes charged to the group now: every process of the tree, page cache included."""
        return pread_int(self._usage_fd)

    def working_set_bytes(self, usage: int | None = None) -> int:
        """Usage less the inactive file cache, which reclaim takes first: the kubelet's count.

        ``usage`` just read by the caller spares re-reading it.
        """
        usage = self.usage_bytes() if usage is None else usage
        return working_set(usage, pread_key(self._stat_fd, self.inactive_file_key))

    @abstractmethod
    def set_limit(self, limit_bytes: int) -> None:
        """The hard ceiling; the kernel holds usage at or below it (reclaim, then OOM)."""

    @abstractmethod
    def limit_bytes(self) -> int: ...

    @abstractmethod
    def peak_bytes(self) -> int | None:
        """Highest usage seen since the group was created (None where the kernel lacks it)."""

    # -- events ---------------------------------------------------------------------------------

    @abstractmethod
    def threshold_eventfd(self, threshold_bytes: int) -> int:
        """A non-blocking fd, readable once usage crosses ``threshold_bytes`` (see subclass).

        The caller owns it: ``await anyio.wait_readable(fd)``, :func:`drain` it, re-read usage,
        and ``os.close`` it to unregister.
        """

    @abstractmethod
    def clear_threshold(self) -> None:
        """Take back what ``threshold_eventfd`` set in the group itself."""

    @abstractmethod
    def oom_eventfd(self) -> int:
        """A non-blocking fd, readable when the group is at its ceiling with nothing to reclaim."""

    @abstractmethod
    def under_oom(self) -> bool:
        """The group is at its ceiling and the kernel found nothing more to reclaim."""

    @abstractmethod
    def oom_killed(self) -> bool:
        """The tree ended because it hit the ceiling (the kernel's kill, or ours on v1)."""

    # -- members --------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process in the group (live ones; exited ones leave it before being reaped).

        Opened anew each time: the kernel builds the list at open (a kept-open descriptor
        read again with pread returns the old list); raw os calls keep it near 8 us.
        """
        try:
            fd = os.open(self._procs_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            chunks: list[bytes] = []
            while chunk := os.read(fd, _PROCS_CHUNK):
                chunks.append(chunk)
        finally:
            os.close(fd)
        return parse_procs(b"".join(chunks).decode("ascii"))

    def empty(self) -> bool:
        return not self.pids()

    def placement(self, command: Sequence[str], cwd: str | None = None) -> Placement:
        """``command`` behind a shim that joins this group, then execs it (same pid).

        The agent is in the group before its first instruction, so nothing it forks escapes,
        and no ``preexec_fn`` is needed (that would force a slow fork). ``cgroup.procs`` is
        opened here, by the daemon, and handed to the shim as its stdin, so it works whatever
        user the agent runs as. If joining fails the shim exits with status 125 (its message
        is in the agent's log). With ``cwd`` the shim then enters it, as the agent's user
        (Popen's ``cwd`` would be entered as root), and exits 125 if it may not.
        """
        try:
            fd = os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"cannot open {self.path}/cgroup.procs: {exc.strerror}") from exc
        if cwd is None:
            return Placement(("/bin/sh", "-c", _SHIM_BY_STDIN, SHIM_NAME, *command), stdin=fd)
        return Placement(("/bin/sh", "-c", _SHIM_BY_STDIN_CD, SHIM_NAME, cwd, *command), stdin=fd)

    def contains(self, pid: int) -> bool:
        """Whether ``pid`` is in this group, from /proc/PID/cgroup (False once it is gone)."""
        try:
            text = read_text(Path(f"/proc/{pid}/cgroup"))
        except (OSError, UnicodeDecodeError):
            return False
        for line in text.splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if self._is_our_hierarchy(hierarchy, controllers.split(",")):
                return path == self.proc_path
        return False

    @abstractmethod
    def _is_our_hierarchy(self, hierarchy_id: str, controllers: list[str]) -> bool: ...

    def signal_all(self, sig: signal.Signals) -> list[int]:
        """One pass: ``sig`` to every member, through a pidfd; returns the pids signalled.

        A pid read from cgroup.procs may end and be reused before we open it. The pidfd refers
        to whichever process held the pid at open; we signal it only if /proc then still shows
        that pid in this group (and if it died meanwhile, the pidfd signal fails harmlessly).
        """
        sent: list[int] = []
        me = os.getpid()
        for pid in self.pids():
            if pid == me:
                continue  # Never the daemon, whatever ended up in the group.
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # Gone already.
            try:
                if self.contains(pid):
                    signal.pidfd_send_signal(pidfd, sig)
                    sent.append(pid)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
        return sent

    # -- end --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the kept-open counters (``remove`` does it); the group itself stays."""
        for fd in (self._usage_fd, self._stat_fd):
            if fd >= 0:
                os.close(fd)
        self._usage_fd = self._stat_fd = -1

    def remove(self, timeout_s: float = 1.0) -> bool:
        """Remove the (empty) group, retrying while the kernel still has it busy.

        True once it is gone (then the kept-open counters are closed too). An eventfd registered
        on it fires one last time on v1: close it. Blocks up to ``timeout_s`` only while the
        last members are still exiting; open descriptors never keep a cgroup busy.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                remove_dir(self.path)
            except FileNotFoundError:
                self.close()
                return True
            except OSError as exc:
                # EBUSY: members still exiting (or memory still being uncharged).
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EAGAIN):
                    raise CgroupError(f"cannot remove {self.path}: {exc.strerror}") from exc
                if time.monotonic() >= deadline:
                    return False  # Still usable: the caller may signal and try again.
                time.sleep(_POLL_S)
            else:
                self.close()
                return True


class CgroupManager(ABC):
    """The daemon's own group (one per home) and the agent groups inside it."""

    version: ClassVar[int]
    agent_class: ClassVar[type[AgentCgroup]]

    def __init__(self, mount: Path, path: Path, reason: str, mount_root: str = "/") -> None:
        self.mount = mount
        self.path = path
        self.reason = reason
        # The part of the hierarchy the mount shows (not "/" for a bind-mounted subtree).
        self.mount_root = mount_root

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    def agent_path(self, subprocess_id: str) -> Path:
        return self.path / f"{AGENT_PREFIX}{subprocess_id}"

    def _open(self, subprocess_id: str) -> AgentCgroup:
        return self._group(self.agent_path(subprocess_id), subprocess_id)

    def _group(self, path: Path, subprocess_id: str) -> AgentCgroup:
        proc_path = posixpath.join(self.mount_root, str(path.relative_to(self.mount)))
        return self.agent_class(path, subprocess_id, proc_path)

    def create(self, subprocess_id: str, limit_bytes: int) -> AgentCgroup:
        """A new group ``agent-<subprocess_id>`` with its ceiling, ready for placement."""
        path = self.agent_path(subprocess_id)
        try:
            make_dir(path)
        except FileExistsError:
            # A leftover of the same id (a crashed daemon): reuse it only if nothing runs in it.
            if parse_procs(read_text(path / "cgroup.procs")):
                raise CgroupError(f"{path} exists and has processes in it") from None
        except OSError as exc:
            raise CgroupError(f"cannot create {path}: {exc.strerror}") from exc
        try:
            self._configure(path, limit_bytes)
            return self._open(subprocess_id)
        except (OSError, CgroupError) as exc:
            # A group that is half set up must not survive: it would have no ceiling.
            with contextlib.suppress(OSError):
                remove_dir(path)
            if isinstance(exc, CgroupError):
                raise
            raise CgroupError(f"cannot configure {path}: {exc.strerror}") from exc

    @abstractmethod
    def _configure(self, path: Path, limit_bytes: int) -> None: ...

    def limit_total(self, limit_bytes: int) -> AgentCgroup:
        """Set the ceiling of the daemon's own group (every agent together); returns it."""
        self._configure_total(self.path)
        group = self._group(self.path, "")
        group.set_limit(limit_bytes)
        return group

    @abstractmethod
    def _configure_total(self, path: Path) -> None:
        """What the daemon's group needs besides its limit."""

    def adopt(self, subprocess_id: str) -> AgentCgroup:
        """Open an existing agent group (recovery after a daemon restart)."""
        return self._open(subprocess_id)

    def agent_ids(self) -> list[str]:
        try:
            names = sorted(entry.name for entry in os.scandir(self.path) if entry.is_dir())
        except FileNotFoundError:
            return []
        return [name[len(AGENT_PREFIX) :] for name in names if name.startswith(AGENT_PREFIX)]

    def cleanup_leftovers(self, known_ids: Iterable[str] = ()) -> Leftovers:
        """Groups a crashed daemon left behind: empty ones are removed, populated ones reported.

        ``known_ids`` (agents being recovered from state.json) are left alone. A populated
        leftover is the caller's to decide: ``adopt`` it, or ``kill`` and ``remove`` it.
        """
        known = set(known_ids)
        removed: list[str] = []
        populated: list[str] = []
        for subprocess_id in self.agent_ids():
            if subprocess_id in known:
                continue
            group = self.adopt(subprocess_id)
            if group.empty() and group.remove(timeout_s=0.2):
                removed.append(subprocess_id)
            else:
                group.close()
                populated.append(subprocess_id)
        return Leftovers(removed=tuple(removed), populated=tuple(populated))

    def remove(self, timeout_s: float = 1.0) -> bool:
        """Remove the daemon's group at shutdown; False while agent groups remain in it."""
        if self.agent_ids():
            return False
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                remove_dir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                    return False
                time.sleep(_POLL_S)
