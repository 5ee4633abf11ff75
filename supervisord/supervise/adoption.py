"""Trees that others started: ``watch`` adopts a running process and its descendants into
supervision, ``unwatch`` lets them go without a signal.

An adopted tree is moved into an agent cgroup of its own where the kernel allows it (v1 as
root; v2 within the daemon's delegated subtree), else supervised through /proc alone. What it
had charged before the move stays in its old group, so it is measured by RSS.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from supervisord.core import policy
from supervisord.core.errors import LaunchError, NotFoundError, UsageError
from supervisord.core.limits import Limits
from supervisord.host import launcher, procfs, watching
from supervisord.host.cgroup import escape
from supervisord.host.cgroup.base import AgentCgroup
from supervisord.host.watching import Target
from supervisord.supervise.agent import Agent
from supervisord.supervise.lifecycle import Lifecycle

log = structlog.get_logger("supervisord.supervise.adoption")


class Adoption(Lifecycle):
    async def watch(
        self,
        target: Target,
        agent_type: str,
        overrides: Mapping[str, Any],
        owner_uid: int | None,
        *,
        run: tuple[str, ...] | None = None,
    ) -> Agent:
        """Adopt a tree that already runs (``claude-pm watch``): identity by pid and start
        time, its members from /proc, moved into an agent cgroup where the kernel allows.

        ``run``: the command a ``claude-pm run`` process is about to exec in its own pid; it
        is told on its stderr why, should the daemon end it."""
        if any(target.pid == pid for a in self.agents.values() for pid, _ in a.members):
            raise UsageError(f"watch: pid {target.pid} is already supervised")
        if run is None:
            # What the tree charged before it was moved stays where it was: RSS counts it.
            overrides = {"metric": "rss", **overrides}
        limits = self.config.limits_for(agent_type, overrides)
        child = launcher.adopt(target.pid, target.start)
        if child is None:
            raise NotFoundError(f"watch: process {target.pid} has ended")
        subprocess_id = launcher.new_subprocess_id(agent_type)
        cgroup, origin = self._move_in(subprocess_id, limits, target.pid)
        now = self.clock()
        command = target.command if run is None else run
        agent = Agent(
            id=subprocess_id,
            agent_type=agent_type,
            command=command,
            child=child,
            limits=limits,
            overrides=overrides,
            started_wall=datetime.now(UTC),
            state=policy.AgentState(started_at=now),
            owner_uid=owner_uid,
            members=((target.pid, target.start),),
            cgroup=cgroup,
            request_mb=limits.warning_mb,
            template=command,
            watched=True,
            origin=origin,
            notify=None if run is None else watching.open_stderr(target.pid, target.uid),
        )
        self._register(agent)
        self.request_full_scan()  # its descendants, now
        await self.state_writer.written()
        log.info("agent_watched", subprocess_id=subprocess_id, pid=target.pid, cgroup=bool(cgroup))
        self.bus.publish(agent.launch_event(now))
        return agent

    def _move_in(
        self, subprocess_id: str, limits: Limits, pid: int
    ) -> tuple[AgentCgroup | None, str | None]:
        """An agent cgroup holding the tree, and where it came from; (None, ...) where the
        kernel does not let the daemon move it (then /proc alone supervises it)."""
        if self.backstop is None:
            return None, None
        origin = escape.proc_group(self.backstop.manager.version, pid)
        cgroup = self.backstop.create(subprocess_id, limits)
        if cgroup is None:
            return None, origin
        problems = escape.move(cgroup.path, procfs.tree_of(pid))
        if problems:
            back = self._origin_dir(origin)
            if back is not None:
                escape.move(back, cgroup.pids())
            cgroup.remove()
            log.warning("watch_without_cgroup", subprocess_id=subprocess_id, problems=problems)
            return None, origin
        return cgroup, origin

    def unwatch(self, subprocess_id: str) -> dict[str, Any]:
        """Let a watched tree go without a signal, back in the group it came from."""
        agent = self.agents.get(subprocess_id)
        if agent is None:
            raise NotFoundError(f"no agent {subprocess_id}")
        if not agent.watched:
            raise UsageError(
                f"unwatch: {subprocess_id} was launched by the daemon, not watched: stop it "
                "instead (its output and its end are the daemon's)"
            )
        if agent.cgroup is not None:
            back = self._origin_dir(agent.origin)
            if back is None:
                problems = ["its original group is unknown"]
            else:
                problems = escape.move(back, agent.cgroup.pids())
            if problems:
                raise LaunchError(
                    f"unwatch: cannot let {subprocess_id} go: its processes could not leave its "
                    f"cgroup ({'; '.join(problems)}); it is still supervised"
                )
            self._retire_later(agent.cgroup)
        del self.agents[subprocess_id]
        self._sampler.forget(subprocess_id)
        for scope in (agent.cgroup_scope, agent.exit_scope):
            if scope is not None:
                scope.cancel()
        self.state_writer.request(force=True)
        log.info("agent_unwatched", subprocess_id=subprocess_id, pid=agent.child.pid)
        return {"subprocess_id": subprocess_id, "pid": agent.child.pid, "released": True}

    def _origin_dir(self, origin: str | None) -> Path | None:
        """Where a tree's original group is, as the daemon's cgroup mount shows it."""
        if origin is None or self.backstop is None:
            return None
        manager = self.backstop.manager
        return escape.group_dir(manager.mount, manager.mount_root, origin)
