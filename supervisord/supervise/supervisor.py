"""The supervisor: the engine's loop, plus what clients ask of it and the host's budget.

Launches are admitted into the budget, queued, or refused; commands stop, cancel and list;
after every sample the host is checked for pressure and one agent shed if it must be.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup

from supervisord.config.home import Home
from supervisord.config.settings import Config
from supervisord.core import budget as budgeting
from supervisord.core import policy
from supervisord.core.budget import Budget, Claim, Usage
from supervisord.core.errors import (
    CgroupError,
    LaunchError,
    LaunchRefused,
    NotFoundError,
    SupervisordError,
)
from supervisord.core.events import ExitEvent
from supervisord.core.history import PeakHistory
from supervisord.core.kinds import EndReason, EventType
from supervisord.core.records import AgentRecord
from supervisord.host import launcher
from supervisord.host.agentlog import OutputPlace
from supervisord.host.cgroup.backstop import Backstop
from supervisord.host.sysmem import RecentAvailable, shared_total_mb, system_memory
from supervisord.supervise import launchplan, recovery
from supervisord.supervise.admission import (
    Admission,
    Queued,
    Waiting,
    host_budget,
    queue_event,
)
from supervisord.supervise.agent import Agent
from supervisord.supervise.engine import Engine, RecordSink
from supervisord.supervise.launchplan import LaunchRequest
from supervisord.supervise.pressure import HostGuard, Shed

log = structlog.get_logger("supervisord.supervise.supervisor")


class Supervisor(Engine):
    def __init__(
        self,
        config: Config,
        home: Home,
        records: RecordSink,
        *,
        budget: Budget | None = None,
        history: PeakHistory | None = None,
        clock: Callable[[], float] = time.monotonic,
        reap_orphans: bool = False,
        on_tick: Callable[[int], None] | None = None,
        tick_at_least_every_s: float | None = None,
        backstop: Backstop | None = None,
    ) -> None:
        super().__init__(
            config,
            home,
            records,
            clock=clock,
            reap_orphans=reap_orphans,
            on_tick=on_tick,
            tick_at_least_every_s=tick_at_least_every_s,
            backstop=backstop,
        )
        self.admission = Admission(
            budget or host_budget(config.host, shared_total_mb()),
            config.host.max_queued,
            history or PeakHistory(),
        )
        self.guard = HostGuard()
        self._total_watch: anyio.CancelScope | None = None
        self._pressure_due = False
        self._available = RecentAvailable()

    # -- commands ---------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> Agent | Queued:
        """Start an agent now if it fits the host's budget; else queue it (or refuse it,
        when it may not wait or could never fit). ``force`` starts it regardless."""
        assert self._tg is not None, "Supervisor.run() must be started first"
        waiting = self._plan(request)
        if not request.force:
            never = budgeting.never_fits(self.admission.budget, waiting.request_mb)
            if never is not None:
                self._refuse(waiting, f"launch of {request.agent_type} refused: {never}")
            verdict = self.admission.check(waiting, self._claims(), self._available())
            if not verdict.fits:
                if not request.queue:
                    refused = f"launch of {request.agent_type} refused (no queueing): it"
                    self._refuse(waiting, f"{refused} {verdict.reason}")
                return await self._enqueue(waiting, verdict.reason)
        return await self._start(waiting)

    def _plan(self, request: LaunchRequest) -> Waiting:
        """Everything about a launch decided before it starts or waits."""
        limits = self.config.limits_for(request.agent_type, request.limits)
        scheduling = self.config.scheduling_for(request.agent_type, request.scheduling)
        command = launchplan.resolve_command(self.config, request, self.home.config_file)
        subprocess_id = launcher.new_subprocess_id(request.agent_type)
        request_mb = self.admission.request_mb(request.agent_type, scheduling, limits)
        return self.admission.waiting(subprocess_id, request, command, scheduling, request_mb)

    def _refuse(self, waiting: Waiting, message: str) -> NoReturn:
        request = waiting.request
        refusal = launchplan.Refusal(
            request.agent_type, waiting.request_mb, message, request.owner_uid
        )
        self._publish_alert(refusal.alert(waiting.subprocess_id, system_memory().as_dict()))
        raise LaunchRefused(message)

    async def _enqueue(self, waiting: Waiting, reason: str) -> Queued:
        position = self.admission.enqueue(waiting, reason)
        # As it was queued: by the time the state is written it may have been admitted.
        queued = Queued(self.admission.get(waiting.subprocess_id), position)
        log.info("launch_queued", subprocess_id=waiting.subprocess_id, position=position)
        self.bus.publish(queue_event(EventType.QUEUED, waiting, reason, position=position))
        await self.state_writer.written()
        self._wake.set()
        return queued

    async def _start(self, waiting: Waiting) -> Agent:
        request, subprocess_id = waiting.request, waiting.subprocess_id
        # The limits in force now: a queued launch gets a reload that came while it waited.
        limits = self.config.limits_for(request.agent_type, request.limits)
        cgroup = None if self.backstop is None else self.backstop.create(subprocess_id, limits)
        log_path = self.home.agent_log(subprocess_id)
        spec = launchplan.spec_for(
            self.config, request, subprocess_id, waiting.command, log_path, cgroup
        )
        try:
            child = launcher.spawn(spec, OutputPlace.of(self.home, self.config.daemon))
        except (LaunchError, CgroupError):
            # Nothing runs in the group yet (placement failed, or the spawn): it must go too.
            if cgroup is not None:
                cgroup.remove()
            raise
        now = self.clock()
        agent = Agent.launched(
            request,
            subprocess_id,
            waiting.command,
            child,
            limits,
            cgroup,
            now,
            scheduling=waiting.scheduling,
            request_mb=waiting.request_mb,
        )
        self._register(agent)
        await self.state_writer.written()
        log.info("agent_launched", subprocess_id=subprocess_id, pid=child.pid)
        self.bus.publish(agent.launch_event(now))
        return agent

    def cancel(self, subprocess_id: str, reason: str = "cancelled") -> Waiting:
        """Take a launch out of the queue."""
        waiting = self.admission.cancel(subprocess_id)
        self.state_writer.request(force=True)
        log.info("launch_cancelled", subprocess_id=subprocess_id, reason=reason)
        self.bus.publish(queue_event(EventType.CANCELLED, waiting, reason))
        return waiting

    def restore_queue(self, entries: list[dict[str, Any]]) -> None:
        """Launches a previous daemon left waiting; they are admitted as they fit."""
        restored, problems = self.admission.restore(entries)
        for waiting in restored:
            log.info("launch_restored", subprocess_id=waiting.subprocess_id)
        for problem in problems:
            log.error("state_unreadable", problem=problem)
        self._wake.set()

    def adopt(self, records: list[AgentRecord]) -> None:
        """Carry on supervising agents a previous daemon left running (after a crash or a
        ``shutdown --leave-agents``); record those that ended meanwhile as ``lost``."""
        place = OutputPlace.of(self.home, self.config.daemon)
        for record in records:
            outcome = recovery.resume(record, self.config, self.backstop, place, self.clock())
            if isinstance(outcome, recovery.Lost):
                if outcome.cgroup is not None:
                    self._retire_later(outcome.cgroup)
                self.records.exit(outcome.event)
                self.bus.publish(outcome.event)
                log.warning("agent_lost", subprocess_id=record.subprocess_id, pid=record.pid)
                continue
            agent = outcome.agent
            self._sampler.remember(agent.id, agent.members)
            self._register(agent)
            self._carry_out(agent, outcome.actions)
            log.info("agent_adopted", subprocess_id=agent.id, pid=agent.child.pid)

    def adopt_leftovers(self) -> None:
        """Trees in agent cgroups that state.json does not name: the usual escalation, then a
        stats record with reason ``lost``."""
        if self.backstop is not None:
            self.adopt(recovery.leftover_records(self.backstop, self.config))

    def get(self, subprocess_id: str) -> Agent:
        try:
            return self.agents[subprocess_id]
        except KeyError:
            raise NotFoundError(f"no agent {subprocess_id}") from None

    def sampling(self) -> dict[str, Any]:
        """How the sampler is doing, for ``status``."""
        return {
            "full_scans": self.full_scans,
            "fast_samples": self.fast_samples,
            "loop_turns": self.loop_turns,
            "last_scan_ms": round(self.last_sample_s * 1000, 2),
            "open_statm_fds": self._sampler.open_fds,
            "discovery_interval_s": self._discovery_interval(),
        }

    def stats(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [agent.stats(now) for agent in self.agents.values()]

    async def stop(
        self,
        subprocess_id: str,
        grace_s: float | None = None,
        reason: EndReason = EndReason.STOPPED,
    ) -> ExitEvent:
        """End one agent with the usual escalation; its stats record once the tree is gone."""
        agent = self.get(subprocess_id)
        grace = agent.limits.term_grace_s if grace_s is None else grace_s
        agent.state, actions = policy.request_end(agent.state, self.clock(), reason, grace)
        self._carry_out(agent, actions)
        self._wake.set()
        await agent.done.wait()
        assert agent.final is not None
        return agent.final

    async def stop_all(self, reason: EndReason = EndReason.DAEMON_SHUTDOWN) -> None:
        async with anyio.create_task_group() as tg:
            for subprocess_id in list(self.agents):
                tg.start_soon(self._stop_quietly, subprocess_id, reason)

    def apply_config(self, config: Config) -> None:
        """New thresholds for running agents (``reload``); their launch overrides still win."""
        for agent in self.agents.values():
            before, agent.limits = (
                agent.limits,
                config.limits_for(agent.agent_type, agent.overrides),
            )
            if self.backstop is not None and agent.cgroup is not None and agent.limits != before:
                # The ceiling moves (or goes, while monitoring is disabled), and the usage
                # threshold registered at launch is registered again at the new max_mb.
                self.backstop.apply(agent.cgroup, agent.limits)
                self._watch_kernel(agent)
            agent.next_due = self.clock()  # held to the new limits at once, not at next tick
        budget = host_budget(config.host, shared_total_mb())
        if budget != self.admission.budget:
            self.admission.budget = budget
            self._watch_total()
        self.admission.max_queued = config.host.max_queued
        self.config = config
        self._wake.set()

    async def _stop_quietly(self, subprocess_id: str, reason: EndReason) -> None:
        with suppress(NotFoundError):  # It may have ended on its own meanwhile.
            await self.stop(subprocess_id, reason=reason)

    # -- the host's budget -------------------------------------------------------------------

    def _claims(self, now: float | None = None) -> list[Claim]:
        at = self.clock() if now is None else now
        return [agent.claim(at) for agent in self.agents.values()]

    async def _admit_waiting(self) -> None:
        """Start queued launches while the head of the queue fits."""
        while self.admission:
            waiting = self.admission.next_ready(self._claims(), self._available())
            if waiting is None:
                return
            try:
                agent = await self._start(waiting)
            except SupervisordError as exc:
                self.state_writer.request(force=True)
                self.bus.publish(queue_event(EventType.CANCELLED, waiting, f"cannot start: {exc}"))
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
        memory = system_memory().as_dict()
        self._publish_alert(agent.pressure_alert(shed.pressure, self.admission.budget, memory))
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
            agent.id, agent.request, agent.command, agent.scheduling, agent.request_mb
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
        the kernel would pick."""
        ending = [a for a in self.agents.values() if a.state.ending and not a.state.kill_sent]
        for agent in ending:
            agent.state, actions = policy.request_end(
                agent.state, self.clock(), agent.state.ending or EndReason.HOST_PRESSURE, 0.0
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

    # -- the engine's hooks -------------------------------------------------------------------

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

    def _queue_entries(self) -> list[dict[str, Any]]:
        return self.admission.entries()

    def _ended(self, agent: Agent, event: ExitEvent) -> bool:
        self.admission.history.add(
            agent.agent_type, event.memory.peak_mb, aborted=event.reason.aborted
        )
        if agent.requeues(event.reason) and self._tg is not None:
            self._tg.start_soon(self._requeue, agent)
            return True
        return False
