"""The kernel backstop as the supervisor uses it: one memory cgroup per agent.

The graceful escalation stays in front (SIGTERM at ``max_mb``); the cgroup adds what polling
cannot: a hard ceiling ``hard_margin_pct`` above ``max_mb`` that no allocation rate can
outrun, an eventfd that wakes the sampler the moment usage reaches ``max_mb``, membership
that no setsid or double fork escapes, and an OOM event when the ceiling is hit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from supervisord.config.cgroup import CgroupSettings
from supervisord.core.errors import CgroupError
from supervisord.core.limits import Limits
from supervisord.core.units import MIB, mb_to_bytes
from supervisord.host.cgroup.base import UNLIMITED, AgentCgroup, CgroupManager, drain
from supervisord.host.cgroup.detect import Detection

log = structlog.get_logger("supervisord.host.cgroup.backstop")


@dataclass
class Backstop:
    manager: CgroupManager
    settings: CgroupSettings
    detection: Detection
    # Agent groups a previous daemon left with processes in them and no state.json entry.
    leftovers: tuple[str, ...] = ()

    def ceiling_mb(self, limits: Limits) -> float:
        return self.settings.ceiling_bytes(limits.max_mb) / MIB

    def ceiling_bytes(self, limits: Limits) -> int:
        """The kernel's limit for these limits: none while monitoring is disabled, which must
        not kill at a ceiling the daemon no longer enforces."""
        return self.settings.ceiling_bytes(limits.max_mb) if limits.enabled else UNLIMITED

    def create(self, subprocess_id: str, limits: Limits) -> AgentCgroup | None:
        """A group for a new agent; None when it cannot be made (then polling alone guards it,
        unless cgroups are required). An agent with monitoring disabled gets one too, without
        a ceiling, so that enabling monitoring later can give it its ceiling back."""
        try:
            return self.manager.create(subprocess_id, self.ceiling_bytes(limits))
        except CgroupError as exc:
            if self.settings.mode == "required":
                raise
            log.warning("cgroup_create_failed", subprocess_id=subprocess_id, error=str(exc))
            return None

    def adopt(self, subprocess_id: str) -> AgentCgroup | None:
        try:
            return self.manager.adopt(subprocess_id)
        except (CgroupError, OSError):
            return None

    def apply(self, cgroup: AgentCgroup, limits: Limits) -> None:
        """New limits (``reload``): move the ceiling with ``max_mb``, or lift it while
        monitoring is disabled. The usage threshold follows when the watch is re-armed."""
        try:
            cgroup.set_limit(self.ceiling_bytes(limits))
        except (CgroupError, OSError) as exc:
            # Usage above a lower new ceiling the kernel could not reclaim: the old one stays,
            # and the daemon's own SIGTERM at max_mb still comes first.
            log.warning("cgroup_limit_failed", path=str(cgroup.path), error=str(exc))

    def limit_total(self, budget_mb: float) -> AgentCgroup | None:
        """The kernel's ceiling for every agent together: the daemon's group, which holds
        every agent group, gets the budget plus the hard margin. None: it cannot (logged)."""
        try:
            return self.manager.limit_total(self.settings.ceiling_bytes(budget_mb))
        except (CgroupError, OSError) as exc:
            log.warning("cgroup_budget_failed", path=str(self.manager.path), error=str(exc))
            return None

    async def watch(
        self,
        cgroup: AgentCgroup,
        threshold_mb: float | None,
        on_threshold: Callable[[], None],
        on_oom: Callable[[float], None],
    ) -> None:
        """Until cancelled: call ``on_threshold`` when usage reaches ``threshold_mb`` (an
        agent's ``max_mb``, or the budget), ``on_oom`` when the group hits its ceiling.

        With no threshold (monitoring disabled) there is nothing to watch: the threshold is
        lifted (on v2 ``memory.high`` would otherwise throttle the agent at its old limit) and
        this returns.
        """
        if threshold_mb is None:
            await anyio.to_thread.run_sync(cgroup.clear_threshold)
            return
        max_mb = threshold_mb
        fds: list[int] = []

        async def oom(fd: int) -> None:
            while True:
                await anyio.wait_readable(fd)
                drain(fd)
                if cgroup.under_oom() or cgroup.oom_killed():
                    on_oom(cgroup.usage_bytes() / MIB)

        async def threshold() -> None:
            # Registering a usage threshold costs the kernel ~10 ms (v1): off the event loop,
            # and shielded so a cancellation cannot drop the descriptor on the floor.
            with anyio.CancelScope(shield=True):
                fd = await anyio.to_thread.run_sync(cgroup.threshold_eventfd, mb_to_bytes(max_mb))
                fds.append(fd)
            while True:
                await anyio.wait_readable(fd)
                drain(fd)
                on_threshold()

        try:
            fds.append(cgroup.oom_eventfd())
            async with anyio.create_task_group() as tg:
                tg.start_soon(oom, fds[0])
                tg.start_soon(threshold)
        finally:
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)

    async def retire(self, cgroup: AgentCgroup) -> None:
        """Remove an agent's group once its tree is gone (the kernel may need a moment)."""
        removed = await anyio.to_thread.run_sync(cgroup.remove)
        if not removed:
            log.warning("cgroup_remove_failed", path=str(cgroup.path))

    def close(self) -> None:
        """At daemon exit: remove emptied agent groups (a removal still in flight when the
        daemon stopped, say), then the daemon's group if no agent is left in it."""
        with suppress(CgroupError, OSError):
            self.manager.cleanup_leftovers(())
            self.manager.remove()

    def status(self) -> dict[str, Any]:
        return {**self.detection.as_dict(), "hard_margin_pct": self.settings.hard_margin_pct}
