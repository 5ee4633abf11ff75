"""Bringing back a process that moved itself out of its agent's memory cgroup.

Writing its pid into the group's ``cgroup.procs`` moves it back where the kernel allows (on
v1 a root daemon may move any task; on v2 only within the daemon's delegated subtree, and
not out of a group it cannot write). What it had charged stays where it went: the sampler
keeps counting such a tree by its RSS.
"""

from __future__ import annotations

from supervisord.host.cgroup.base import AgentCgroup, write_file


def bring_back(cgroup: AgentCgroup, pid: int) -> str | None:
    """Move ``pid`` back into ``cgroup``; None when it is back, else why not."""
    try:
        write_file(cgroup.path / "cgroup.procs", str(pid))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if cgroup.contains(pid) else "the kernel did not move it"
