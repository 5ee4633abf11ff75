"""cgroup v2 memory controller: memory.max, memory.oom.group, cgroup.kill, inotify on events.

v2 has what v1 lacks: ``memory.oom.group = 1`` makes the kernel's OOM kill take the whole
group, and ``cgroup.kill`` SIGKILLs every member atomically (no race with forks). It has no
usage thresholds: the nearest thing is ``memory.high``, a soft ceiling that throttles the
group (heavy reclaim, allocation delays) and counts ``high`` events in ``memory.events``.
Every change of ``memory.events`` and ``cgroup.events`` is a "file modified" event, so an
inotify descriptor on them is the v2 counterpart of v1's eventfds.

v2 forbids processes in a group whose children have controllers enabled (the
"no internal processes" rule): the daemon's own group can hold agent groups only once the
daemon has moved into a leaf of its own, which ``setup`` does when it is alone there (as in
a systemd unit with ``Delegate=yes``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from supervisord.core.errors import CgroupError
from supervisord.host.cgroup import base as base
from supervisord.host.cgroup.base import UNLIMITED, AgentCgroup, CgroupManager

_IN_MODIFY = 0x00000002
_libc = ctypes.CDLL(None, use_errno=True)


def inotify_fd(*paths: Path) -> int:
    """A non-blocking inotify descriptor, readable when any of ``paths`` is modified."""
    fd = int(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise CgroupError(f"inotify_init1 failed: {os.strerror(err)}")
    for path in paths:
        if int(_libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY)) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise CgroupError(f"cannot watch {path}: {os.strerror(err)}")
    return fd


class V2AgentCgroup(AgentCgroup):
    version = 2
    usage_file = "memory.current"
    inactive_file_key = b"inactive_file"

    def set_limit(self, limit_bytes: int) -> None:
        try:
            value = "max" if limit_bytes >= UNLIMITED else str(limit_bytes)
            base.write_file(self.path / "memory.max", value)
        except OSError as exc:
            raise CgroupError(
                f"cannot set the limit of {self.path} to {limit_bytes}: {exc.strerror}"
            ) from exc

    def limit_bytes(self) -> int:
        text = base.read_text(self.path / "memory.max").strip()
        return UNLIMITED if text == "max" else int(text)

    def peak_bytes(self) -> int | None:
        try:
            return base.read_int(self.path / "memory.peak")  # Linux >= 5.19
        except FileNotFoundError:
            return None

    def threshold_eventfd(self, threshold_bytes: int) -> int:
        """Sets ``memory.high`` to ``threshold_bytes`` and watches ``memory.events``.

        Unlike v1 this throttles the group above the threshold (which buys the daemon's
        SIGTERM time), and there is one such threshold per group: a second call moves it.
        The fd becomes readable when ``memory.events`` changes (its ``high`` counter counts
        each time the group went over); drain it and re-read usage.
        """
        try:
            base.write_file(self.path / "memory.high", str(threshold_bytes))
        except OSError as exc:
            raise CgroupError(f"cannot set memory.high of {self.path}: {exc.strerror}") from exc
        return inotify_fd(self.path / "memory.events")

    def clear_threshold(self) -> None:
        try:
            base.write_file(self.path / "memory.high", "max")
        except OSError as exc:
            raise CgroupError(f"cannot lift memory.high of {self.path}: {exc.strerror}") from exc

    def oom_eventfd(self) -> int:
        """Readable when ``memory.events`` changes; ``oom_killed()`` then says if it was OOM."""
        return inotify_fd(self.path / "memory.events")

    def _events(self) -> dict[str, int]:
        return base.read_keyed(self.path / "memory.events")

    def under_oom(self) -> bool:
        if self._events().get("oom", 0):
            self._oom_seen = True
            return True
        return False

    def oom_killed(self) -> bool:
        try:
            events = self._events()
        except FileNotFoundError:
            events = {}
        kills = events.get("oom_kill", 0) + events.get("oom_group_kill", 0)
        return self._oom_seen or kills > 0

    def empty(self) -> bool:
        try:
            events = base.read_keyed(self.path / "cgroup.events")
        except FileNotFoundError:
            return True
        return events.get("populated", 0) == 0

    def _is_our_hierarchy(self, hierarchy_id: str, controllers: list[str]) -> bool:
        return hierarchy_id == "0" and controllers == [""]


def _words(path: Path) -> set[str]:
    # The kernel lists controllers bare; tolerate the "+name" form that was written.
    return {word.lstrip("+") for word in base.read_text(path).split()}


def _enable_memory(group: Path) -> None:
    if "memory" not in _words(group / "cgroup.subtree_control"):
        base.write_file(group / "cgroup.subtree_control", "+memory")


class V2Manager(CgroupManager):
    version = 2
    agent_class = V2AgentCgroup

    @classmethod
    def setup(
        cls, mount: Path, root: Path, name: str, *, own_group: bool, mount_root: str = "/"
    ) -> V2Manager:
        """Create (or reuse) the daemon's group ``root/name`` with memory enabled below it.

        ``own_group``: ``root`` is the group the daemon runs in, so the daemon may move into
        a leaf ``root/<name>.daemon`` to satisfy the no-internal-processes rule.
        """
        controllers = _words(root / "cgroup.controllers")
        if "memory" not in controllers:
            listed = " ".join(sorted(controllers)) or "none"
            raise CgroupError(
                f"cgroup v2 at {root} has no memory controller (cgroup.controllers: {listed})"
            )
        note = ""
        try:
            _enable_memory(root)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"cannot enable memory in {root}: {exc.strerror}") from exc
            others = set(base.parse_procs(base.read_text(root / "cgroup.procs"))) - {os.getpid()}
            if not own_group or others:
                raise CgroupError(
                    f"{root} holds processes, so cgroup v2 cannot enable memory for groups "
                    "below it; run the daemon in a unit with Delegate=yes, or set [cgroup] "
                    "root to a delegated group without processes"
                ) from exc
            leaf = root / f"{name}.daemon"
            _ensure_dir(leaf)
            base.write_file(leaf / "cgroup.procs", str(os.getpid()))
            _enable_memory(root)
            note = f" (the daemon moved into {leaf})"
        parent = root / name
        _ensure_dir(parent)
        _enable_memory(parent)
        reason = f"cgroup v2 memory controller at {parent}{note}"
        return cls(mount, parent, reason, mount_root)

    def _configure(self, path: Path, limit_bytes: int) -> None:
        # The kernel's OOM kill then takes the whole tree, never one process of it.
        if (path / "memory.oom.group").exists():
            base.write_file(path / "memory.oom.group", "1")
        base.write_file(path / "memory.max", str(limit_bytes))

    def _configure_total(self, path: Path) -> None:
        """Nothing: v2 cannot pause a group at its ceiling, so there the kernel's OOM kill
        picks the victim (one agent's whole group, by memory.oom.group); the daemon's
        shedding at the budget itself, woken by ``memory.high``, is meant to come first."""


def _ensure_dir(path: Path) -> None:
    try:
        base.make_dir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot create {path}: {exc.strerror}") from exc
