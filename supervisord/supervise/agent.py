"""One supervised agent: what the supervisor knows of it, and the records it produces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import anyio

from supervisord.core import cadence, policy
from supervisord.core.budget import Budget, Claim, Pressure
from supervisord.core.clock import timestamps
from supervisord.core.events import AlertEvent, ExitEvent, LaunchEvent, MemoryStats, Projection
from supervisord.core.identity import Identity
from supervisord.core.kinds import AlertKind, EndReason, Level
from supervisord.core.limits import Limits
from supervisord.core.lineage import Lineage
from supervisord.core.policy import Action, Alert
from supervisord.core.records import AgentRecord
from supervisord.core.restart import Next, RestartPolicy
from supervisord.core.scheduling import Scheduling
from supervisord.core.tracker import Tracking
from supervisord.core.units import MIB
from supervisord.host.cgroup.base import AgentCgroup
from supervisord.host.launcher import UNKNOWN_EXIT, Child, ExitStatus
from supervisord.host.sampler import TreeSample
from supervisord.supervise.launchplan import LaunchRequest


@dataclass(eq=False)
class Agent:
    id: str
    agent_type: str
    command: tuple[str, ...]
    child: Child
    limits: Limits
    overrides: Mapping[str, Any]
    started_wall: datetime
    state: policy.AgentState
    owner_uid: int | None = None
    members: tuple[Identity, ...] = ()
    tracking: Tracking = field(default_factory=Tracking)
    exit: ExitStatus | None = None
    final: ExitEvent | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    next_due: float = 0.0
    signalled_at: float | None = None  # when the first SIGTERM (or SIGKILL) went out
    cgroup: AgentCgroup | None = None
    cgroup_scope: anyio.CancelScope | None = None
    scheduling: Scheduling = field(default_factory=Scheduling)
    # What it is taken to need of the host's budget (scheduling.request_mb, or derived).
    request_mb: float = 0.0
    # The launch that started it, for a requeue (None: re-adopted without one).
    request: LaunchRequest | None = None
    # The last sample taken of its tree (None before the first).
    sample: TreeSample | None = None
    # Its command before the placeholders of this run were filled in: the next run's.
    template: tuple[str, ...] = ()
    lineage: Lineage = field(default_factory=Lineage)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    # What follows this run, decided as its tree is gone (None: nothing, it ended for good).
    next: Next | None = None
    signalled_before_exit: bool = False
    # Members seen outside its cgroup, each reported once (cgroup_escape).
    escapes: set[Identity] = field(default_factory=set)
    # Adopted by `watch` (not launched): the group its tree came from, to go back to.
    watched: bool = False
    origin: str | None = None
    exit_scope: anyio.CancelScope | None = None
    # Where to say why, when the daemon ends it (`claude-pm run`'s terminal), once.
    notify: IO[str] | None = None
    _entry_key: tuple[Any, ...] | None = None
    _entry: dict[str, Any] | None = None

    @classmethod
    def launched(
        cls,
        request: LaunchRequest,
        subprocess_id: str,
        command: tuple[str, ...],
        child: Child,
        limits: Limits,
        cgroup: AgentCgroup | None,
        now: float,
        *,
        scheduling: Scheduling,
        request_mb: float,
        template: tuple[str, ...],
        lineage: Lineage,
        restart: RestartPolicy,
    ) -> Agent:
        """An agent just spawned for ``request``."""
        return cls(
            id=subprocess_id,
            agent_type=request.agent_type,
            command=command,
            child=child,
            limits=limits,
            overrides=dict(request.limits),
            started_wall=datetime.now(UTC),
            state=policy.AgentState(started_at=now),
            owner_uid=request.owner_uid,
            members=((child.pid, child.start),),
            cgroup=cgroup,
            scheduling=scheduling,
            request_mb=request_mb,
            request=request,
            template=template,
            lineage=lineage,
            restart=restart,
        )

    def claim(self, now: float) -> Claim:
        """Its hold on the host's budget."""
        growth = self.tracking.growth
        return Claim(
            subprocess_id=self.id,
            used_mb=self.state.current_mb,
            request_mb=self.request_mb,
            priority=self.scheduling.priority,
            growth_mb_s=None if growth is None else growth.rate_mb_s,
            age_s=now - self.state.started_at,
            ending=self.state.ending is not None,
        )

    def launch_event(self, now: float) -> LaunchEvent:
        return LaunchEvent(
            self.id, self.agent_type, self.child.pid, self.stats(now), owner_uid=self.owner_uid
        )

    def status_word(self) -> str:
        if self.state.ending is not None and self.state.ending.aborted:
            return "ABORTED"
        return self.state.level.name

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "subprocess_id": self.id,
            "agent_type": self.agent_type,
            "pid": self.child.pid,
            "command": list(self.command),
            "current_mb": round(self.state.current_mb, 1),
            "peak_mb": round(self.state.peak_mb, 1),
            "start_mb": self.tracking.start_mb,
            "level": self.state.level.name,
            "status": self.status_word(),
            "tree_pids": [pid for pid, _ in self.members],
            "process_count": len(self.members),
            "started_at": timestamps(self.started_wall)["timestamp"],
            "duration_seconds": round(now - self.state.started_at, 1),
            "warnings_count": len(self.state.warnings),
            "warnings": list(self.state.warnings),
            "ending": None if self.state.ending is None else self.state.ending.value,
            "limits": self.limits.as_dict(),
            "owner_uid": self.owner_uid,
            "request_mb": self.request_mb,
            "priority": self.scheduling.priority,
            "on_pressure": self.scheduling.on_pressure,
            **self.projection().as_dict(),
            **self.memory_figures(),
            "run": self.lineage.runs.run,
            "restarts": self.lineage.runs.run - 1,
            "restart": self.restart.restart,
            "session_uuid": self.lineage.session_uuid,
            "session_id": self.lineage.session_id,
            "watched": self.watched,
            # What holds the tree: its memory cgroup, or /proc alone (a tree `watch` could
            # not move into one).
            "supervised_by": "proc" if self.cgroup is None else "cgroup",
        }

    def memory_figures(self) -> dict[str, Any]:
        """What ``current_mb`` measured, and the tree counted the other cheap ways: the sum
        of its RSS (shared pages once per process) and its cgroup's working set."""
        sample = self.sample
        working_set = None if sample is None else sample.working_set_bytes
        if working_set is None and self.cgroup is not None:
            try:
                working_set = self.cgroup.working_set_bytes()
            except OSError:
                working_set = None  # the group is going with the agent
        return {
            "measured": None if sample is None else sample.metric,
            "rss_mb": None if sample is None else round(sample.rss_bytes / MIB, 1),
            "working_set_mb": None if working_set is None else round(working_set / MIB, 1),
        }

    def projection(self) -> Projection:
        """Growth rate and time to the hard limit at that rate (None: not growing)."""
        growth = self.tracking.growth
        if growth is None:
            return Projection()
        eta = cadence.time_to(growth, self.limits.max_mb)
        return Projection(
            growth_mb_s=round(growth.rate_mb_s, 1),
            time_to_limit_s=None if eta is None else round(eta, 1),
        )

    def row(self, now: float) -> dict[str, Any]:
        """The compact form ``status`` lists (``stats`` has everything)."""
        return {
            "subprocess_id": self.id,
            "agent_type": self.agent_type,
            "pid": self.child.pid,
            "current_mb": round(self.state.current_mb, 1),
            "peak_mb": round(self.state.peak_mb, 1),
            "level": self.state.level.name,
            "status": self.status_word(),
            "ending": None if self.state.ending is None else self.state.ending.value,
            "process_count": len(self.members),
            "duration_seconds": round(now - self.state.started_at, 1),
            "max_mb": self.limits.max_mb,
            "run": self.lineage.runs.run,
            "restarts": self.lineage.runs.run - 1,
        }

    def requeues(self, reason: EndReason) -> bool:
        """Whether it waits in the queue again after ending for ``reason``."""
        return (
            reason is EndReason.HOST_PRESSURE
            and self.scheduling.on_pressure == "requeue"
            and self.request is not None
        )

    def pressure_alert(
        self, pressure: Pressure, budget: Budget, system_memory: Mapping[str, float]
    ) -> AlertEvent:
        """The host_pressure alert of its being shed, with the host's figures."""
        return AlertEvent(
            kind=AlertKind.HOST_PRESSURE,
            subprocess_id=self.id,
            agent_type=self.agent_type,
            pid=self.child.pid,
            current_mb=self.state.current_mb,
            threshold_mb=budget.budget_mb,
            message=(
                f"{pressure.message}: stopping {self.id} (priority "
                f"{self.scheduling.priority}, {self.state.current_mb:.1f} MB)"
            ),
            system_memory=system_memory,
            reason=EndReason.HOST_PRESSURE,
            projection=self.projection(),
            owner_uid=self.owner_uid,
            host=pressure.figures(budget),
        )

    def alert_event(self, alert: Alert, system_memory: Mapping[str, float]) -> AlertEvent:
        """The alerts-log record of one of the policy's alerts, with the figures that make it
        actionable: growth, time to the limit, and for a signal the crossing-to-signal time."""
        crossed = None
        if alert.kind in (AlertKind.SIGTERM_SENT, AlertKind.SIGKILL_SENT) and (
            self.tracking.crossed_at is not None and self.signalled_at is not None
        ):
            crossed = round(self.signalled_at - self.tracking.crossed_at, 4)
        return AlertEvent(
            kind=alert.kind,
            subprocess_id=self.id,
            agent_type=self.agent_type,
            pid=self.child.pid,
            current_mb=alert.current_mb,
            threshold_mb=alert.threshold_mb,
            message=alert.message,
            system_memory=system_memory,
            reason=self.state.ending,
            projection=self.projection(),
            crossed_to_term_s=crossed,
            owner_uid=self.owner_uid,
        )

    def exit_event(
        self, now: float, *, cgroup_peak_mb: float | None = None, term_to_gone_s: float | None
    ) -> ExitEvent:
        """Its stats record, once the tree is gone."""
        reason = self.state.ending or EndReason.EXITED
        status = self.exit or UNKNOWN_EXIT
        return ExitEvent(
            subprocess_id=self.id,
            agent_type=self.agent_type,
            pid=self.child.pid,
            command=self.command,
            exit_code=status.exit_code,
            signal=status.signal,
            reason=reason,
            memory=MemoryStats(
                start_mb=self.tracking.start_mb if self.tracking.start_mb is not None else 0.0,
                peak_mb=round(self.state.peak_mb, 1),
                end_mb=round(self.tracking.end_mb, 1),
                duration_seconds=round(now - self.state.started_at, 1),
                warnings=self.state.warnings,
                aborted=reason.aborted,
                cgroup_peak_mb=cgroup_peak_mb,
            ),
            term_to_gone_s=term_to_gone_s,
            requeued=self.requeues(reason),
            owner_uid=self.owner_uid,
            run=self.lineage.run,
        )

    def state_entry(self) -> tuple[bool, dict[str, Any]]:
        """This agent's run/state.json entry, and whether it changed since last asked.

        Rebuilt only when something a restarted daemon needs has changed (level, a new peak
        MB, warnings, the tree's members, the limits), so an idle fleet costs no rewrites.
        """
        key = (
            self.state.level,
            round(self.state.peak_mb),
            len(self.state.warnings),
            self.state.ending,
            self.state.term_sent_at,
            self.state.kill_sent,
            self.members,
            self.tracking.start_mb,
            self.limits,
            self.lineage,
        )
        if key != self._entry_key or self._entry is None:
            self._entry_key, self._entry = key, self.snapshot().as_dict()
            return True, self._entry
        return False, self._entry

    def snapshot(self) -> AgentRecord:
        """What run/state.json keeps of this agent."""
        return AgentRecord(
            subprocess_id=self.id,
            agent_type=self.agent_type,
            command=list(self.command),
            pid=self.child.pid,
            start=self.child.start,
            started_wall=self.started_wall.isoformat(),
            limits=self.limits.as_dict(),
            overrides=dict(self.overrides),
            owner_uid=self.owner_uid,
            start_mb=self.tracking.start_mb,
            peak_mb=round(self.state.peak_mb, 1),
            end_mb=round(self.tracking.end_mb, 1),
            warnings=list(self.state.warnings),
            level=self.state.level.name,
            ending=None if self.state.ending is None else self.state.ending.value,
            members=[[pid, start] for pid, start in self.members],
            term_sent_wall=self._wall(self.state.term_sent_at),
            grace_s=self.state.grace_s if self.state.ending is not None else None,
            kill_sent=self.state.kill_sent,
            scheduling=self.scheduling.as_dict(),
            request_mb=self.request_mb,
            launch=None if self.request is None else self.request.as_dict(),
            template=list(self.template),
            lineage=self.lineage.as_dict(self._wall_offset()),
            watched=self.watched,
            origin=self.origin,
        )

    def _wall_offset(self) -> float:
        """Wall-clock seconds minus the supervisor's clock, from when this run started."""
        return self.started_wall.timestamp() - self.state.started_at

    def _wall(self, at: float | None) -> str | None:
        """A monotonic instant of this agent's life as wall-clock time, for state.json."""
        if at is None:
            return None
        return (self.started_wall + timedelta(seconds=at - self.state.started_at)).isoformat()

    @classmethod
    def restore(
        cls,
        record: AgentRecord,
        child: Child,
        limits: Limits,
        now: float,
        restart: RestartPolicy | None = None,
    ) -> tuple[Agent, list[Action]]:
        """An agent a previous daemon left running, as that daemon last saw it, and what to do
        about it now (an escalation that daemon began goes on where it was)."""
        wall_now = datetime.now(UTC)
        started_wall = datetime.fromisoformat(record.started_wall)
        age_s = max(0.0, (wall_now - started_wall).total_seconds())
        state = policy.AgentState(
            started_at=now - age_s,
            level=Level[record.level],
            peak_mb=record.peak_mb,
            current_mb=record.end_mb,
            warnings=tuple(record.warnings),
        )
        actions: list[Action] = []
        if record.ending is not None:
            sent_ago = None
            if record.term_sent_wall is not None:
                sent = datetime.fromisoformat(record.term_sent_wall)
                sent_ago = max(0.0, (wall_now - sent).total_seconds())
            grace = limits.term_grace_s if record.grace_s is None else record.grace_s
            state, actions = policy.resume_end(
                state,
                now,
                EndReason(record.ending),
                grace,
                term_sent_s_ago=sent_ago,
                kill_sent=record.kill_sent,
            )
        agent = cls(
            id=record.subprocess_id,
            agent_type=record.agent_type,
            command=tuple(record.command),
            child=child,
            limits=limits,
            overrides=record.overrides,
            started_wall=started_wall,
            state=state,
            owner_uid=record.owner_uid,
            members=tuple((pid, start) for pid, start in record.members),
            tracking=Tracking(start_mb=record.start_mb, end_mb=record.end_mb),
            scheduling=Scheduling(**record.scheduling),
            request_mb=record.request_mb if record.request_mb is not None else limits.warning_mb,
            request=None if record.launch is None else LaunchRequest.from_dict(record.launch),
            template=tuple(record.template or record.command),
            lineage=Lineage.from_dict(record.lineage, wall_now.timestamp() - now),
            restart=restart or RestartPolicy(),
            watched=record.watched,
            origin=record.origin,
        )
        return agent, actions
