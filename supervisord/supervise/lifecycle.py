"""What follows the end of a run: the agent's next run (its restart policy), or the launches
that waited for it (``--after``), or nothing: it has ended for good.

The decision is taken as the tree is gone, before its stats record is written, so that the
record says when the next run is due. A run due again waits out its delay in ``Restarts``
and then goes through admission like any launch, with the same subprocess id.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any

import structlog

from supervisord.core.errors import NotFoundError, SupervisordError, UsageError
from supervisord.core.events import AlertEvent, ExitEvent, RestartEvent
from supervisord.core.kinds import AlertKind, EndReason, EventType
from supervisord.core.restart import Next, after_run
from supervisord.host.cgroup.base import AgentCgroup
from supervisord.host.sysmem import system_memory
from supervisord.supervise.admission import Queued, Waiting, queue_event
from supervisord.supervise.after import Dependencies, Outcome, cancelled_outcome
from supervisord.supervise.agent import Agent
from supervisord.supervise.fleet import Fleet
from supervisord.supervise.restarts import Pending, Restarts

log = structlog.get_logger("supervisord.supervise.lifecycle")


def ended_well(event: ExitEvent) -> bool:
    """Exit code 0, or an end by itself whose status nobody could reap (an agent re-adopted
    after a daemon crash): no evidence of a failure, as for the restart policy."""
    unknown = event.exit_code is None and event.signal is None
    return event.ok or (event.reason is EndReason.EXITED and unknown)


def describe_end(event: ExitEvent) -> str:
    """How a run ended, for the reason of whatever that cancels."""
    if event.reason is EndReason.EXITED:
        if event.signal:
            return f"was killed by {event.signal}"
        code = "unknown" if event.exit_code is None else event.exit_code
        return f"exited with exit code {code}"
    return f"ended ({event.reason.value})"


class Lifecycle(Fleet):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restarts = Restarts()
        self.dependencies = Dependencies()

    async def _admit(self, waiting: Waiting) -> Agent | Queued:
        """Start it if it fits the budget, else queue it (the supervisor's)."""
        raise NotImplementedError

    def wall_offset(self) -> float:
        """Wall-clock time minus this supervisor's clock (run/state.json keeps wall times)."""
        return time.time() - self.clock()

    # -- deciding, as a run's tree is gone --------------------------------------------------

    def _closing(self, agent: Agent, event: ExitEvent) -> ExitEvent:
        agent.next = self._next_run(agent, event)
        if agent.next is None or agent.next.delay_s is None:
            return event
        return replace(event, next_restart_s=round(agent.next.delay_s, 3))

    def _next_run(self, agent: Agent, event: ExitEvent) -> Next | None:
        if agent.request is None or agent.requeues(event.reason):
            return None  # adopted without its launch (nothing to run again), or requeued
        runs = agent.lineage.runs
        if event.reason is EndReason.RESTART:
            return Next(agent.lineage.following(agent.state.started_at, streak=0).runs, 0.0)
        # A status nobody could reap (a re-adopted agent) is no evidence of a failure.
        signalled = agent.signalled_before_exit or (event.signal is None)
        if not agent.restart.wants(event.reason, event.exit_code, signalled):
            return None
        return after_run(agent.restart, runs, agent.state.started_at, self.clock(), random.random())

    def _ended(self, agent: Agent, event: ExitEvent) -> bool:
        if super()._ended(agent, event):
            return True
        nxt = agent.next
        if nxt is None or nxt.delay_s is None:
            if nxt is not None and nxt.failed is not None:
                self._give_up(agent, event, nxt.failed)
            else:
                self._final(self._outcome(agent, ended_well(event), describe_end(event)))
            return False
        assert agent.request is not None
        waiting = Waiting(
            agent.id,
            agent.request,
            agent.template,
            agent.scheduling,
            agent.request_mb,
            seq=0,
            lineage=replace(agent.lineage, runs=nxt.runs),
        )
        pending = Pending(
            waiting,
            due=self.clock() + nxt.delay_s,
            reason=event.reason.value,
            delay_s=nxt.delay_s,
            last=event.record(),
            ready=agent.cgroup is None,
        )
        self.restarts.add(pending)
        log.info("restart_due", subprocess_id=agent.id, run=nxt.runs.run, delay_s=nxt.delay_s)
        self._publish_run(
            EventType.RESTARTING,
            waiting,
            run=agent.lineage.run,
            reason=event.reason.value,
            message=f"run {agent.lineage.run} {describe_end(event)}: run {nxt.runs.run} "
            f"in {nxt.delay_s:.2f} s",
            delay_s=round(nxt.delay_s, 3),
            exit_code=event.exit_code,
        )
        if agent.cgroup is not None and self._tg is not None:
            self._tg.start_soon(self._retire_for, agent.cgroup, pending)
        return agent.cgroup is not None

    async def _retire_for(self, cgroup: AgentCgroup, pending: Pending) -> None:
        """The next run's group has the same name: the old one goes first."""
        if self.backstop is not None:
            await self.backstop.retire(cgroup)
        pending.ready = True
        self._wake.set()

    def _give_up(self, agent: Agent, event: ExitEvent, why: str) -> None:
        """Too many runs within the window: a restart_limit alert, and no run again."""
        message = f"{agent.id} failed: {why}"
        self._publish_alert(
            AlertEvent(
                kind=AlertKind.RESTART_LIMIT,
                subprocess_id=agent.id,
                agent_type=agent.agent_type,
                pid=agent.child.pid,
                current_mb=agent.state.peak_mb,
                threshold_mb=agent.limits.max_mb,
                message=message,
                system_memory=system_memory().as_dict(),
                reason=event.reason,
                owner_uid=agent.owner_uid,
            )
        )
        self.bus.publish(
            RestartEvent(
                EventType.RESTART_LIMIT,
                agent.id,
                agent.agent_type,
                run=agent.lineage.run,
                reason=event.reason.value,
                message=message,
                exit_code=event.exit_code,
                owner_uid=agent.owner_uid,
            )
        )
        outcome = self._outcome(agent, False, f"failed: {why}", failed=True)
        if agent.request is not None:
            # Asked for again by hand, it starts a fresh window: no quick failures counted.
            lineage = agent.lineage.following(agent.state.started_at, streak=0)
            lineage = replace(lineage, runs=replace(lineage.runs, starts=()))
            again = Waiting(
                agent.id,
                agent.request,
                agent.template,
                agent.scheduling,
                agent.request_mb,
                0,
                reason=EndReason.RESTART.value,
                lineage=lineage,
            )
            outcome = replace(outcome, again=again)
        self._final(outcome)

    def _outcome(self, agent: Agent, ok: bool, why: str, *, failed: bool = False) -> Outcome:
        return Outcome(agent.id, agent.agent_type, ok, why, failed, agent.owner_uid)

    def _final(self, outcome: Outcome) -> None:
        """An agent ended for good: what waited for it starts, or is cancelled."""
        ready, cancelled = self.dependencies.ended(outcome)
        for waiting, why in cancelled:
            log.info("launch_cancelled", subprocess_id=waiting.subprocess_id, reason=why)
            self.bus.publish(queue_event(EventType.CANCELLED, waiting, why))
        for waiting in ready:
            if self._tg is not None:
                self._tg.start_soon(self._launch_ready, waiting)
        if ready or cancelled:
            self.state_writer.request(force=True)

    async def _launch_ready(self, waiting: Waiting) -> None:
        log.info("launch_unblocked", subprocess_id=waiting.subprocess_id)
        try:
            await self._admit(waiting)
        except SupervisordError as exc:
            self._start_failed(waiting, exc)

    def _start_failed(self, waiting: Waiting, exc: SupervisordError) -> None:
        super()._start_failed(waiting, exc)
        self._final(cancelled_outcome(waiting, f"cannot start: {exc}"))

    def _publish_run(
        self, kind: EventType, waiting: Waiting, *, run: int, reason: str, message: str, **kw: Any
    ) -> None:
        request = waiting.request
        self.bus.publish(
            RestartEvent(
                kind,
                waiting.subprocess_id,
                request.agent_type,
                run=run,
                reason=reason,
                message=message,
                owner_uid=request.owner_uid,
                **kw,
            )
        )

    # -- runs due again -------------------------------------------------------------------

    async def _after_turn(self, sampled: bool) -> None:
        for pending in self.restarts.take_due(self.clock()):
            self.state_writer.request(force=True)
            try:
                await self._admit(replace(pending.waiting, reason=pending.reason))
            except SupervisordError as exc:
                self._start_failed(pending.waiting, exc)
        await super()._after_turn(sampled)

    def _longest_wait(self) -> float:
        return min(super()._longest_wait(), self.restarts.wait_s(self.clock()))

    def _queue_entries(self) -> dict[str, list[dict[str, Any]]]:
        offset = self.wall_offset()
        return {
            **super()._queue_entries(),
            "restarts": self.restarts.entries(offset),
            "after": self.dependencies.entries(offset),
            "ended": self.dependencies.ended_entries(offset),
        }

    def started(self, agent: Agent, reason: str) -> None:
        """A run after the first has started: ``restarted``."""
        if agent.lineage.run > 1 and agent.request is not None:
            waiting = Waiting(
                agent.id, agent.request, agent.template, agent.scheduling, agent.request_mb, 0
            )
            self._publish_run(
                EventType.RESTARTED,
                waiting,
                run=agent.lineage.run,
                reason=reason,
                message=f"run {agent.lineage.run} started (pid {agent.child.pid})",
                pid=agent.child.pid,
            )

    # -- what clients ask -------------------------------------------------------------------

    def end_restarts(self, subprocess_id: str, by: str) -> dict[str, Any]:
        """``stop`` or ``kill`` of an agent between runs: no run comes again. Its last run's
        record, saying so."""
        pending = self.restarts.cancel(subprocess_id)
        why = f"restarts cancelled by {by}"
        self.bus.publish(queue_event(EventType.CANCELLED, pending.waiting, why))
        self._final(cancelled_outcome(pending.waiting, why))
        self.state_writer.request(force=True)
        return {**pending.last, "next_restart_s": None, "restart_cancelled": True}

    def restart_pending_now(self, subprocess_id: str) -> dict[str, Any]:
        """``restart`` of an agent between runs: its next run is due now."""
        pending = self.restarts.get(subprocess_id)
        pending.due = self.clock()
        self._wake.set()
        return {"subprocess_id": subprocess_id, "run": pending.waiting.lineage.run}

    def pending_after(self, after: tuple[str, ...]) -> list[str]:
        """Of the agents a launch waits for, those that have not ended yet; an unknown one,
        or one that already ended any other way than with exit code 0, is an error."""
        pending = []
        for subprocess_id in after:
            if self.knows(subprocess_id):
                pending.append(subprocess_id)
                continue
            outcome = self.dependencies.outcome(subprocess_id)
            if outcome is None:
                raise UsageError(
                    f"launch: after: no agent {subprocess_id!r} runs, waits or ended lately; "
                    "give ids that `claude-pm status` or `claude-pm queue` lists"
                )
            if not outcome.ok:
                raise UsageError(f"launch: after: {subprocess_id} already {outcome.why}")
        return pending

    def knows(self, subprocess_id: str) -> bool:
        """It runs, or waits to (queued, between runs, after others)."""
        return any(
            subprocess_id in where
            for where in (self.agents, self.admission, self.restarts, self.dependencies)
        )

    def owner_of(self, subprocess_id: str) -> int | None:
        """Who launched it, wherever it is (NotFoundError: nowhere)."""
        if subprocess_id in self.agents:
            return self.agents[subprocess_id].owner_uid
        for find in (self.admission.get, self.restarts.get, self.dependencies.get):
            try:
                found = find(subprocess_id)
            except NotFoundError:
                continue
            waiting = found.waiting if isinstance(found, Pending) else found
            return waiting.request.owner_uid
        outcome = self.dependencies.outcome(subprocess_id)
        if outcome is None:
            raise NotFoundError(f"no agent {subprocess_id}")
        return outcome.owner_uid

    def end_all_restarts(self) -> None:
        """The daemon stops its agents: none of them runs again."""
        for pending in list(self.restarts):
            self.end_restarts(pending.subprocess_id, "the daemon's shutdown")
