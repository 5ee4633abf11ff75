"""cgroup v1 memory controller: limit_in_bytes, usage thresholds and OOM events via eventfd.

v1 differs from v2 in two ways that matter here:

- Its OOM killer takes only the largest process of the group, never the whole tree, and an
  agent that loses one helper may limp on. So every agent group has ``oom_kill_disable = 1``:
  at the ceiling the kernel pauses the group (``under_oom 1``) and signals the OOM eventfd,
  and the daemon SIGKILLs every member itself (there is no ``cgroup.kill`` on v1).
- It can wake a waiter the moment usage crosses a threshold (``cgroup.event_control``), which
  v2 cannot; the daemon uses that to send SIGTERM at ``max_mb`` without polling.
"""

from __future__ import annotations

import os
from pathlib import Path

from supervisord.core.errors import CgroupError
from supervisord.host.cgroup import base as base
from supervisord.host.cgroup.base import AgentCgroup, CgroupManager

_EVENTFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK
# Usage this close to the group's limit means the group itself is at its ceiling (the kernel
# holds usage at the limit exactly; a margin for pages charged and uncharged meanwhile).
OWN_CEILING = 0.98


class V1AgentCgroup(AgentCgroup):
    version = 1
    usage_file = "memory.usage_in_bytes"
    # Hierarchical like usage_in_bytes; in a leaf (an agent group) it equals inactive_file.
    inactive_file_key = b"total_inactive_file"

    def set_limit(self, limit_bytes: int) -> None:
        try:
            write_limits(self.path, limit_bytes)
        except OSError as exc:
            # EBUSY: usage is above the new limit and the kernel could not reclaim enough.
            raise CgroupError(
                f"cannot set the limit of {self.path} to {limit_bytes}: {exc.strerror}"
            ) from exc

    def limit_bytes(self) -> int:
        return base.read_int(self.path / "memory.limit_in_bytes")

    def peak_bytes(self) -> int | None:
        return base.read_int(self.path / "memory.max_usage_in_bytes")

    def threshold_eventfd(self, threshold_bytes: int) -> int:
        """An eventfd the kernel signals whenever usage crosses ``threshold_bytes``, up or down.

        The check runs as pages are charged (every 128 page events per CPU), so the wake-up
        comes a few milliseconds after the crossing at most. Register one per threshold.
        """
        return self._register(self._usage_fd, str(threshold_bytes))

    def clear_threshold(self) -> None:
        """Nothing to undo: a v1 threshold lives only as long as its eventfd."""

    def oom_eventfd(self) -> int:
        """An eventfd signalled when the group hits its ceiling (at once if it already has)."""
        fd = os.open(self.path / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self._register(fd, "")
        finally:
            os.close(fd)  # The kernel needs it only while registering.

    def _register(self, file_fd: int, argument: str) -> int:
        efd = os.eventfd(0, _EVENTFD_FLAGS)
        line = f"{efd} {file_fd} {argument}".rstrip()
        try:
            base.write_file(self.path / "cgroup.event_control", line)
        except OSError as exc:
            os.close(efd)
            raise CgroupError(f"cannot register an event on {self.path}: {exc.strerror}") from exc
        return efd

    def under_oom(self) -> bool:
        """At its own ceiling. The kernel marks every group below one at its ceiling as
        under OOM too (and signals their eventfds): an agent paused because all agents
        together reached theirs is not at its own, and must not be killed as if it were."""
        oom = base.read_keyed(self.path / "memory.oom_control")
        if oom.get("under_oom", 0) and self.usage_bytes() >= OWN_CEILING * self.limit_bytes():
            self._oom_seen = True
            return True
        return False

    def oom_killed(self) -> bool:
        try:
            kernel_kills = base.read_keyed(self.path / "memory.oom_control").get("oom_kill", 0)
        except FileNotFoundError:
            kernel_kills = 0
        return self._oom_seen or kernel_kills > 0

    def _is_our_hierarchy(self, hierarchy_id: str, controllers: list[str]) -> bool:
        return "memory" in controllers


def write_limits(path: Path, limit_bytes: int) -> None:
    """Set the RAM ceiling, and RAM+swap to the same value where swap is accounted.

    Without the memsw limit an agent at its ceiling would be pushed into swap instead of
    stopped. The kernel insists on limit <= memsw at every moment, hence the order.
    """
    limit = path / "memory.limit_in_bytes"
    memsw = path / "memory.memsw.limit_in_bytes"
    if not memsw.exists():
        base.write_file(limit, str(limit_bytes))
    elif limit_bytes > base.read_int(memsw):
        base.write_file(memsw, str(limit_bytes))
        base.write_file(limit, str(limit_bytes))
    else:
        base.write_file(limit, str(limit_bytes))
        base.write_file(memsw, str(limit_bytes))


class V1Manager(CgroupManager):
    version = 1
    agent_class = V1AgentCgroup

    @classmethod
    def setup(cls, mount: Path, parent: Path, mount_root: str = "/") -> V1Manager:
        """Create (or reuse) the daemon's group ``parent`` inside the v1 memory hierarchy."""
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cannot create {parent}: {exc.strerror}") from exc
        # Without hierarchy an agent's charge would not count against the daemon's own
        # group's limit. Linux >= 6.x forces it on; older kernels default to on everywhere.
        if base.read_int(parent / "memory.use_hierarchy") != 1:
            raise CgroupError(f"{parent}/memory.use_hierarchy is 0: set it to 1 on {mount}")
        return cls(mount, parent, f"cgroup v1 memory controller at {parent}", mount_root)

    def _configure(self, path: Path, limit_bytes: int) -> None:
        # Pause at the ceiling instead of killing only the largest process (see module doc).
        base.write_file(path / "memory.oom_control", "1")
        write_limits(path, limit_bytes)

    def _configure_total(self, path: Path) -> None:
        # At the agents' common ceiling too the kernel pauses them, and the daemon picks
        # whom to kill by priority, not the kernel by size.
        base.write_file(path / "memory.oom_control", "1")
