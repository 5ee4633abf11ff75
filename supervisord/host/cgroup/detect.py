"""The kernel backstop: every agent in a memory cgroup of its own, with a hard ceiling.

The daemon's graceful escalation (warning, critical, SIGTERM at ``max_mb``, SIGKILL) stays in
front; the kernel holds the tree at ``max_mb * (1 + hard_margin_pct / 100)`` whatever happens
between two samples, counts every byte of the tree (including processes that setsid or
double-fork away) and lets the daemon kill the whole tree through the group.

    detection = detect(settings.root, settings.mode, group=group_name(home.root))
    log.info("cgroups", mode=detection.in_force, reason=detection.reason)
    if (manager := detection.manager) is not None:
        cg = manager.create(subprocess_id, settings.ceiling_bytes(limits.max_mb))
        placement = cg.placement(command)
        popen = subprocess.Popen(placement.argv, stdin=placement.stdin, ...)
        placement.close()
        term_fd = cg.threshold_eventfd(mb_to_bytes(limits.max_mb))   # wake for SIGTERM
        oom_fd = cg.oom_eventfd()                                     # wake for the ceiling

See docs/cgroups.md for v1 against v2, systemd delegation and the measured figures;
``v1`` and ``v2`` hold the two file protocols, ``base`` what they share, ``backstop`` how the
supervisor uses them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from supervisord.config.cgroup import Mode
from supervisord.core.errors import CgroupError, CgroupUnavailable
from supervisord.host.cgroup.base import CgroupManager
from supervisord.host.cgroup.v1 import V1Manager
from supervisord.host.cgroup.v2 import V2Manager

MOUNTINFO = "/proc/self/mountinfo"
PROC_CGROUP = "/proc/self/cgroup"


def group_name(home_root: Path | str) -> str:
    """The daemon's group name: derived from its home, so two daemons never share one and a
    restarted daemon finds the groups its predecessor left."""
    digest = hashlib.sha256(str(Path(home_root).absolute()).encode()).hexdigest()[:12]
    return f"claude-pm-{digest}"


@dataclass(frozen=True, slots=True)
class Detection:
    """What ``detect`` found: the manager to use (None: no cgroups) and why, for ``status``."""

    manager: CgroupManager | None
    reason: str
    requested: Mode = "auto"

    @property
    def in_force(self) -> Literal["v1", "v2", "off"]:
        if self.manager is None:
            return "off"
        return "v1" if self.manager.version == 1 else "v2"

    def as_dict(self) -> dict[str, Any]:
        """For ``status`` and the daemon log."""
        return {
            "mode": self.requested,
            "in_force": self.in_force,
            "path": None if self.manager is None else str(self.manager.path),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class _Mount:
    point: Path
    root: str  # The part of the hierarchy the mount shows (mountinfo field 4).
    version: int

    def dir_for(self, cgroup_path: str) -> Path:
        """The directory of a /proc/PID/cgroup path under this mount."""
        rel = os.path.relpath(cgroup_path, self.root)
        if rel == ".":
            return self.point
        if rel.startswith(".."):
            raise CgroupError(f"cgroup {cgroup_path} is outside what {self.point} shows")
        return self.point / rel


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _mounts(text: str) -> tuple[_Mount | None, _Mount | None]:
    """The first cgroup2 mount and the first v1 mount carrying the memory controller."""
    v2: _Mount | None = None
    v1: _Mount | None = None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount = _Mount(Path(_unescape(fields[4])), _unescape(fields[3]), 2)
        if tail[0] == "cgroup2" and v2 is None:
            v2 = mount
        elif tail[0] == "cgroup" and "memory" in tail[2].split(",") and v1 is None:
            v1 = _Mount(mount.point, mount.root, 1)
    return v2, v1


def _own_groups(text: str) -> tuple[str | None, str | None]:
    """The daemon's v2 group and v1 memory group, from /proc/self/cgroup."""
    v2: str | None = None
    v1: str | None = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _has_memory(group: Path) -> bool:
    try:
        return "memory" in (group / "cgroup.controllers").read_text().split()
    except OSError:
        return False


def _setup(root: str | None, group: str, mountinfo: str, proc_cgroup: str) -> CgroupManager:
    try:
        v2, v1 = _mounts(Path(mountinfo).read_text())
        own_v2, own_v1 = _own_groups(Path(proc_cgroup).read_text())
    except OSError as exc:
        raise CgroupError(f"cannot read {exc.filename} (cgroups need Linux)") from exc
    if root is not None:
        return _setup_at(Path(root), group, v2, v1)
    missing: list[str] = []
    if v2 is not None:
        if own_v2 is not None and _has_memory(v2.dir_for(own_v2)):
            return V2Manager.setup(
                v2.point, v2.dir_for(own_v2), group, own_group=True, mount_root=v2.root
            )
        where = "has no memory controller" if not _has_memory(v2.point) else "does not delegate"
        missing.append(f"cgroup v2 at {v2.point} {where}")
        if where == "does not delegate":
            missing[-1] += f" memory to the daemon's group {own_v2}"
    if v1 is not None and own_v1 is not None:
        manager = V1Manager.setup(v1.point, v1.dir_for(own_v1) / group, v1.root)
        if missing:
            manager.reason += f" ({missing[0]})"
        return manager
    missing.append("no v1 memory hierarchy is mounted")
    raise CgroupError(" and ".join(missing))


def _setup_at(root: Path, group: str, v2: _Mount | None, v1: _Mount | None) -> CgroupManager:
    candidates = [m for m in (v2, v1) if m is not None and root.is_relative_to(m.point)]
    if not candidates:
        mounted = ", ".join(str(m.point) for m in (v2, v1) if m is not None) or "none"
        raise CgroupError(
            f"[cgroup] root {root} is not inside a cgroup v2 or v1 memory hierarchy "
            f"(mounted: {mounted})"
        )
    mount = max(candidates, key=lambda m: len(m.point.parts))
    if mount.version == 1:
        return V1Manager.setup(mount.point, root / group, mount.root)
    if not root.is_dir():
        raise CgroupError(f"[cgroup] root {root} does not exist: create and delegate it first")
    return V2Manager.setup(mount.point, root, group, own_group=False, mount_root=mount.root)


def detect(
    root: str | None,
    mode: Mode,
    *,
    group: str,
    mountinfo: str = MOUNTINFO,
    proc_cgroup: str = PROC_CGROUP,
) -> Detection:
    """Find and prepare the hierarchy to use; ``reason`` says which mode is in force and why.

    ``mode="auto"`` falls back to no cgroups (``manager`` None) with the reason; ``"required"``
    raises :class:`CgroupUnavailable` instead; ``"off"`` does not look. cgroup v2 is used
    where it has the memory controller, else the v1 memory hierarchy. ``group`` is the
    daemon's group name (:func:`group_name`); ``root`` is where it is created (default: the
    daemon's own group). Creates that group (v2: may move the daemon into a leaf).
    """
    if mode == "off":
        return Detection(None, 'off: [cgroup] mode = "off"', mode)
    try:
        try:
            manager = _setup(root, group, mountinfo, proc_cgroup)
        except OSError as exc:  # A control file that is missing or refuses us.
            raise CgroupError(f"{exc.filename}: {exc.strerror}") from exc
    except CgroupError as exc:
        if mode == "required":
            raise CgroupUnavailable(f'[cgroup] mode = "required", but {exc}') from exc
        return Detection(None, f"off: {exc}", mode)
    return Detection(manager, manager.reason, mode)


def enclosing_limit_bytes(mountinfo: str = MOUNTINFO, proc_cgroup: str = PROC_CGROUP) -> int | None:
    """The tightest memory limit on the daemon's own cgroup and its ancestors (a container's
    or a systemd slice's), or None when nothing limits it below the host."""
    try:
        v2, v1 = _mounts(Path(mountinfo).read_text())
        own_v2, own_v1 = _own_groups(Path(proc_cgroup).read_text())
    except OSError:
        return None
    if v1 is not None and own_v1 is not None:
        mount, own, name = v1, own_v1, "memory.limit_in_bytes"
    elif v2 is not None and own_v2 is not None:
        mount, own, name = v2, own_v2, "memory.max"
    else:
        return None
    try:
        group = mount.dir_for(own)
    except CgroupError:
        return None
    limits: list[int] = []
    while group.is_relative_to(mount.point):
        try:
            text = (group / name).read_text().strip()
        except OSError:
            text = "max"
        if text != "max":
            limits.append(int(text))
        if group == mount.point:
            break
        group = group.parent
    # v1 reports "no limit" as the largest page-aligned 63-bit value.
    real = [limit for limit in limits if limit < 2**62]
    return min(real) if real else None
