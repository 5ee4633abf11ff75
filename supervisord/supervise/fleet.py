"""The host's memory budget on top of the engine: admission, the queue, shedding.

Launches wait in the admission queue until they fit; after every sample the host is checked
for pressure and one agent shed if it must be; the kernel watches every agent together at
the budget. ``Supervisor`` adds the commands that start and stop agents.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from supervisord.config.home import Home
from supervisord.config.settings import Config
from supervisord.core import budget as budgeting
from supervisord.core import policy
from supervisord.core.budget import Budget, Claim, Usage
from supervisord.core.errors import SupervisordError
from supervisord.core.events import ExitEvent
from supervisord.core.history import PeakHistory
from supervisord.core.kinds import EndReason, EventType
from supervisord.host.sysmem import RecentAvailable, shared_total_mb, system_memory
from supervisord.supervise.admission import (
    Admission,
    Queued,
    Waiting,
    host_budget,
    queue_event,
)
from supervisord.supervise.agent import Agent
from supervisord.supervise.engine import Engine, RecordSink
from supervisord.supervise.pressure import HostGuard, Shed

log = structlog.get_logger("supervisord.supervise.fleet")
# How long admission waits after a shed: a check interval (the next sample), half a second at
# the least.
SHED_HOLD_INTERVALS = 1
SHED_HOLD_MIN_S = 0.5


class Fleet(Engine):
    """The engine, with every agent held to the host's budget."""

    def __init__(
        self,
        config: Config,
        home: Home,
        records: RecordSink,
        *,
        budget: Budget | None = None,
        history: PeakHistory | None = None,
        **engine: Any,
    ) -> None:
        """``engine``: the engine's own keywords (clock, backstop, ...)."""
        super().__init__(config, home, records, **engine)
        self.admission = Admission(
            budget or host_budget(config.host, shared_total_mb()),
            config.host.max_queued,
            history or PeakHistory(),
        )
        self.guard = HostGuard()
        self._total_watch: anyio.CancelScope | None = None
        self._pressure_due = False
        self._available = RecentAvailable()
        self._shed_at = float("-inf")

    async def _start(self, waiting: Waiting) -> Agent:
        """Start a launch now (the supervisor's)."""
        raise NotImplementedError

    def _start_failed(self, waiting: Waiting, exc: SupervisordError) -> None:
        """A launch that waited could not start after all: it leaves the queue for good."""
        self.state_writer.request(force=True)
        self.bus.publish(queue_event(EventType.CANCELLED, waiting, f"cannot start: {exc}"))

    def _apply_host(self, config: Config) -> None:
        """The budget and queue length of a new config (``reload``)."""
        budget = host_budget(config.host, shared_total_mb())
        if budget != self.admission.budget:
            self.admission.budget = budget
            self._watch_total()
        self.admission.max_queued = config.host.max_queued

    async def _enqueue(self, waiting: Waiting, reason: str) -> Queued:
        position = self.admission.enqueue(waiting, reason)
        # As it was queued: by the time the state is written it may have been admitted.
        queued = Queued(self.admission.get(waiting.subprocess_id), position)
        log.info("launch_queued", subprocess_id=waiting.subprocess_id, position=position)
        self.bus.publish(queue_event(EventType.QUEUED, waiting, reason, position=position))
        await self.state_writer.written()
        self._wake.set()
        return queued

    def _claims(self, now: float | None = None) -> list[Claim]:
        at = self.clock() if now is None else now
        return [agent.claim(at) for agent in self.agents.values()]

    def _held_off(self) -> bool:
        """Right after a shed, nothing is admitted for a moment (the kubelet's eviction
        pressure transition, in short): the figures that made room were read as the victim
        went, while the agents that pressed on kept growing, and a launch let in on them
        (the victim itself, requeued) would be shed again at once."""
        hold_s = max(SHED_HOLD_INTERVALS * self.config.daemon.check_interval_s, SHED_HOLD_MIN_S)
        return self.clock() < self._shed_at + hold_s

    async def _admit_waiting(self) -> None:
        """Start queued launches while the head of the queue fits."""
        if self._held_off():
            return
        while self.admission:
            waiting = self.admission.next_ready(self._claims(), self._available())
            if waiting is None:
                return
            try:
                agent = await self._start(waiting)
            except SupervisordError as exc:
                self._start_failed(waiting, exc)
                continue
            self.bus.publish(
                queue_event(EventType.ADMITTED, waiting, "fits the budget", pid=agent.child.pid)
            )

    def _check_pressure(self) -> None:
        if not self.agents:
            return
        used = sum(agent.state.current_mb for agent in self.agents.values())
        shed = self.guard.check(
            self.admission.budget,
            used,
            self._available(),
            self._claims,
            self.agents.__contains__,
        )
        if shed is not None:
            self._shed(shed)

    def _shed(self, shed: Shed, grace_s: float | None = None) -> None:
        """End the victim with the usual escalation (at once: ``grace_s`` 0), reason
        host_pressure, after an alert with the host's figures."""
        agent = self.agents[shed.victim.subprocess_id]
        self._shed_at = self.clock()
        memory = system_memory().as_dict()
        alert = agent.pressure_alert(shed.pressure, self.admission.budget, memory)
        self._publish_alert(alert)
        self._tell(agent, alert.message)
        grace = agent.limits.term_grace_s if grace_s is None else grace_s
        agent.state, actions = policy.request_end(
            agent.state, self.clock(), EndReason.HOST_PRESSURE, grace
        )
        self._carry_out(agent, actions)

    async def _requeue(self, agent: Agent) -> None:
        """A shed agent with on_pressure = "requeue" waits in the queue again, same id; its
        group goes first, so the next run's group of the same name starts empty."""
        assert agent.request is not None
        if agent.cgroup is not None and self.backstop is not None:
            await self.backstop.retire(agent.cgroup)
        waiting = self.admission.waiting(
            agent.id,
            agent.request,
            agent.template,
            agent.scheduling,
            agent.request_mb,
            agent.lineage.following(agent.state.started_at),
        )
        try:
            await self._enqueue(waiting, "requeued after being shed for host pressure")
        except SupervisordError as exc:
            log.warning("requeue_failed", subprocess_id=agent.id, error=str(exc))

    def host_status(self) -> dict[str, Any]:
        """The budget and its use, for ``status``, ``queue`` and ``top``."""
        budget = self.admission.budget
        usage = Usage.of(self._claims())
        return {
            **budget.as_dict(),
            "used_mb": usage.used_mb,
            "requested_mb": usage.requested_mb,
            "held_mb": usage.held_mb,
            "free_mb": round(max(budget.budget_mb - usage.held_mb, 0.0), 1),
            "queue_length": len(self.admission),
            "max_queued": self.admission.max_queued,
            "shedding": self.guard.shedding,
            "sheds": dict(self.guard.sheds),
            "kernel_ceiling": self._total_watch is not None,
        }

    def _watch_total(self) -> None:
        """(Re)start the kernel's watch of every agent together at the budget in force."""
        if self._kernel is None or self._tg is None:
            return
        if self._total_watch is not None:
            self._total_watch.cancel()
        scope = self._total_watch = anyio.CancelScope()

        async def watch() -> None:
            assert self._kernel is not None
            with scope:
                budget_mb = self.admission.budget.budget_mb
                await self._kernel.watch_total(budget_mb, self._pressure_now, self._at_ceiling)

        self._tg.start_soon(watch)

    def _pressure_now(self) -> None:
        """The kernel says every agent together just reached the budget: sample every tree
        now (one pread each where idle), so that the shed is chosen on fresh figures, not on
        samples up to an interval old while leakers grow."""
        now = self.clock()
        for agent in self.agents.values():
            agent.next_due = min(agent.next_due, now)
        self._pressure_due = True
        self._wake.set()

    def _at_ceiling(self) -> None:
        """Every agent together hit the kernel's ceiling (v1 pauses them there): agents
        already being ended are killed now, else the one the budget ranks last, not the one
        the kernel would pick. While one killed is still going, no other is: its memory is
        on its way back, and the kernel may say "ceiling" again before it is (a tree still
        there long after its SIGKILL is stuck: the next one goes, see ``policy.going``)."""
        now = self.clock()
        ending = [a for a in self.agents.values() if policy.going(a.state, now)]
        for agent in ending:
            if agent.state.kill_sent:
                continue
            agent.state, actions = policy.request_end(
                agent.state, now, agent.state.ending or EndReason.HOST_PRESSURE, 0.0
            )
            self._carry_out(agent, actions)
        order = budgeting.shed_order(self._claims())
        if ending or not order:
            return
        budget = self.admission.budget
        found = budgeting.Pressure(
            budgeting.Trigger.BUDGET,
            f"every agent together reached the kernel's ceiling above the {budget.budget_mb:g}"
            " MB budget",
            sum(agent.state.current_mb for agent in self.agents.values()),
            self._available(),
            None,
        )
        self.guard.shedding = order[0].subprocess_id
        self.guard.sheds[found.trigger.value] += 1
        self._shed(Shed(order[0], found), grace_s=0.0)

    def _background(self, tg: TaskGroup) -> None:
        self._watch_total()

    async def _after_turn(self, sampled: bool) -> None:
        if sampled or self.admission or self._pressure_due:
            self._pressure_due = False
            self._check_pressure()
            await self._admit_waiting()

    def _longest_wait(self) -> float:
        # Memory may free outside the fleet too: a waiting launch looks again soon.
        return self.config.daemon.check_interval_s if self.admission else float("inf")

    def _queue_entries(self) -> dict[str, list[dict[str, Any]]]:
        return {"queue": self.admission.entries(time.time() - self.clock())}

    def _ended(self, agent: Agent, event: ExitEvent) -> bool:
        self.admission.history.add(
            agent.agent_type, event.memory.peak_mb, aborted=event.reason.aborted
        )
        if agent.requeues(event.reason) and self._tg is not None:
            self._tg.start_soon(self._requeue, agent)
            return True
        return False
