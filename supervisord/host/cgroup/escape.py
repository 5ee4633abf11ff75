"""Moving processes between memory cgroups: an escapee back into its agent's group, a tree
``watch`` adopts into one, and out again to where it came from on ``unwatch``.

Writing its pid into the group's ``cgroup.procs`` moves it back where the kernel allows (on
v1 a root daemon may move any task; on v2 only within the daemon's delegated subtree, and
not out of a group it cannot write). What it had charged stays where it went: the sampler
keeps counting such a tree by its RSS.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from pathlib import Path

from supervisord.host.cgroup.base import AgentCgroup, write_file


def bring_back(cgroup: AgentCgroup, pid: int) -> str | None:
    """Move ``pid`` back into ``cgroup``; None when it is back, else why not."""
    try:
        write_file(cgroup.path / "cgroup.procs", str(pid))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if cgroup.contains(pid) else "the kernel did not move it"


def proc_group(version: int, pid: int) -> str | None:
    """The memory hierarchy's group that ``/proc/PID/cgroup`` names (None: gone)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if (version == 1 and "memory" in controllers.split(",")) or (
            version == 2 and hierarchy == "0"
        ):
            return path
    return None


def group_dir(mount: Path, mount_root: str, proc_path: str) -> Path | None:
    """The directory of a group named as /proc names it, where this mount shows it."""
    relative = posixpath.relpath(proc_path, mount_root)
    return None if relative.startswith("..") else mount / relative


def move(directory: Path, pids: Iterable[int]) -> list[str]:
    """Move each of ``pids`` into the group at ``directory``; what could not be, and why."""
    problems = []
    for pid in pids:
        try:
            write_file(directory / "cgroup.procs", str(pid))
        except ProcessLookupError:
            continue  # it ended since the tree was read: nothing of it is left to move
        except OSError as exc:
            problems.append(f"pid {pid}: {exc.strerror or exc}")
    return problems
