"""The kernel's view of each agent's tree, through its memory cgroup.

Usage reaching ``max_mb`` wakes the sampler at once (the policy then decides, as for any
sample); the tree reaching its hard ceiling goes to the policy as a kernel OOM, which
SIGKILLs it. The watch is (re)started whenever an agent's limits change (``reload``), so the
usage threshold always sits at the ``max_mb`` in force.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import structlog
from anyio.abc import TaskGroup

from supervisord.core import policy
from supervisord.core.errors import CgroupError
from supervisord.core.policy import Action
from supervisord.host.cgroup.backstop import Backstop
from supervisord.host.cgroup.base import AgentCgroup
from supervisord.supervise.agent import Agent

log = structlog.get_logger("supervisord.supervise.kernel")


class KernelWatch:
    def __init__(
        self,
        backstop: Backstop,
        clock: Callable[[], float],
        wake: Callable[[], None],
        carry_out: Callable[[Agent, list[Action]], None],
    ) -> None:
        self.backstop = backstop
        self._clock = clock
        self._wake = wake
        self._carry_out = carry_out

    def start(self, agent: Agent, tg: TaskGroup) -> None:
        """(Re)start the watch of ``agent``'s cgroup for its limits in force."""
        if agent.cgroup is None:
            return
        if agent.cgroup_scope is not None:
            agent.cgroup_scope.cancel()
        scope = agent.cgroup_scope = anyio.CancelScope()
        tg.start_soon(self._watch, agent, agent.cgroup, scope)

    async def watch_total(
        self, budget_mb: float, at_threshold: Callable[[], None], at_ceiling: Callable[[], None]
    ) -> None:
        """Until cancelled: the daemon's group (every agent) at the budget and its ceiling."""
        group = await anyio.to_thread.run_sync(self.backstop.limit_total, budget_mb)
        if group is None:
            return
        # v1 pauses every agent at the common ceiling and waits for the daemon to choose; v2
        # has OOM-killed one agent's group by then, and another kill would be one too many.
        ceiling = at_ceiling if group.version == 1 else at_threshold
        try:
            await self.backstop.watch(group, budget_mb, at_threshold, lambda _mb: ceiling())
        except* (CgroupError, OSError) as errors:
            log.warning("cgroup_budget_watch_failed", errors=[str(e) for e in errors.exceptions])
        finally:
            group.close()

    async def _watch(self, agent: Agent, cgroup: AgentCgroup, scope: anyio.CancelScope) -> None:
        def at_threshold() -> None:
            agent.next_due = self._clock()  # look now, not at the next tick
            self._wake()

        def at_ceiling(mb: float) -> None:
            if not agent.limits.enabled:
                return  # No ceiling is set while monitoring is disabled; never kill for one.
            ceiling_mb = self.backstop.ceiling_mb(agent.limits)
            agent.state, actions = policy.kernel_oom(agent.state, self._clock(), mb, ceiling_mb)
            self._carry_out(agent, actions)

        with scope:
            try:
                threshold = agent.limits.max_mb if agent.limits.enabled else None
                await self.backstop.watch(cgroup, threshold, at_threshold, at_ceiling)
            except* (CgroupError, OSError) as group:
                # The group went away under us (an agent that ended at once, its group
                # already removed): one agent's watcher, never the daemon. Polling carries on.
                errors = [str(exc) for exc in group.exceptions]
                log.warning("cgroup_watch_failed", subprocess_id=agent.id, errors=errors)
