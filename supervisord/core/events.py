"""The event stream: frozen records of launches, alerts and exits.

The supervisor publishes these; the socket (``subscribe``), the record logs, metrics and
webhooks consume them and match on their types. They become dicts only at those edges,
through ``record()`` (the log line of CONTRACT.md) and ``as_dict()`` (the stream's form: the
record plus its ``type``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from supervisord.core.clock import timestamps
from supervisord.core.kinds import AlertKind, EndReason, EventType, Level


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class LaunchEvent:
    """An agent started (or was admitted): its ``stats`` as the ``stats`` command shows them."""

    type: ClassVar[EventType] = EventType.LAUNCH
    subprocess_id: str
    agent_type: str
    pid: int
    stats: Mapping[str, Any]
    at: datetime = field(default_factory=_now)
    # Who launched the agent (the peer's uid): whose subscriptions see the event. Kept off
    # the record and the wire, whose shapes are the contract's.
    owner_uid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, **self.stats, **timestamps(self.at)}


@dataclass(frozen=True, slots=True)
class Projection:
    """Growth rate and time to the hard limit at that rate (None: not growing)."""

    growth_mb_s: float | None = None
    time_to_limit_s: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"growth_mb_s": self.growth_mb_s, "time_to_limit_s": self.time_to_limit_s}


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One line of memory-alerts.log."""

    type: ClassVar[EventType] = EventType.ALERT
    kind: AlertKind
    subprocess_id: str
    agent_type: str
    pid: int | None
    current_mb: float
    threshold_mb: float
    message: str
    system_memory: Mapping[str, float]
    # Why the agent is being ended, when it is.
    reason: EndReason | None = None
    # Growth figures of an agent being sampled (absent from a refused launch's alert).
    projection: Projection | None = None
    # Estimated crossing of max_mb to the first signal (on sigterm_sent and sigkill_sent).
    crossed_to_term_s: float | None = None
    at: datetime = field(default_factory=_now)
    # Whose subscriptions see it, as on LaunchEvent; not in the record either.
    owner_uid: int | None = None
    # The host's figures behind a host_pressure alert (budget, usage, available, PSI).
    host: Mapping[str, Any] | None = None

    @property
    def level(self) -> Level:
        return self.kind.level

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            **timestamps(self.at),
            "level": self.level.name,
            "event": self.kind.value,
            "subprocess_id": self.subprocess_id,
            "agent_type": self.agent_type,
            "pid": self.pid,
            "current_mb": round(self.current_mb, 1),
            "threshold_mb": self.threshold_mb,
            "message": self.message,
            "system_memory": dict(self.system_memory),
        }
        if self.reason is not None:
            record["reason"] = self.reason.value
        if self.projection is not None:
            record.update(self.projection.as_dict())
        if self.crossed_to_term_s is not None:
            record["crossed_to_term_s"] = self.crossed_to_term_s
        if self.host is not None:
            record["host"] = dict(self.host)
        return record

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, **self.record()}


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """The ``memory_stats`` of a stats record."""

    start_mb: float
    peak_mb: float
    end_mb: float
    duration_seconds: float
    warnings: tuple[str, ...]
    aborted: bool
    # The kernel's own high-water mark of the tree, under cgroups.
    cgroup_peak_mb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "start_mb": self.start_mb,
            "peak_mb": self.peak_mb,
            "end_mb": self.end_mb,
            "duration_seconds": self.duration_seconds,
            "warnings": list(self.warnings),
            "aborted": self.aborted,
        }
        if self.cgroup_peak_mb is not None:
            stats["cgroup_peak_mb"] = self.cgroup_peak_mb
        return stats


@dataclass(frozen=True, slots=True)
class ExitEvent:
    """An agent's tree is gone: one line of subprocess-stats.jsonl."""

    type: ClassVar[EventType] = EventType.EXIT
    subprocess_id: str
    agent_type: str
    pid: int
    command: tuple[str, ...]
    exit_code: int | None
    signal: str | None
    reason: EndReason
    memory: MemoryStats
    # From the first signal to the whole tree gone (the stream's figure, not the record's).
    term_to_gone_s: float | None = None
    # Shed with on_pressure = "requeue": it waits in the queue to run again (same id).
    requeued: bool = False
    at: datetime = field(default_factory=_now)
    # Whose subscriptions see it, as on LaunchEvent; not in the record either.
    owner_uid: int | None = None
    # Which run of the agent this was (from 1), and seconds until the next (None: no next).
    run: int = 1
    next_restart_s: float | None = None

    @property
    def ok(self) -> bool:
        """It ended by itself with exit code 0."""
        return self.reason is EndReason.EXITED and self.exit_code == 0

    def record(self) -> dict[str, Any]:
        return {
            "subprocess_id": self.subprocess_id,
            "agent_type": self.agent_type,
            "pid": self.pid,
            "command": list(self.command),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": self.reason.value,
            "memory_stats": self.memory.as_dict(),
            "run": self.run,
            "restarts": self.run - 1,
            "next_restart_s": self.next_restart_s,
            **timestamps(self.at),
        }

    def as_dict(self) -> dict[str, Any]:
        event = {"type": self.type.value, **self.record()}
        if self.term_to_gone_s is not None:
            event["term_to_gone_s"] = self.term_to_gone_s
        if self.requeued:
            event["requeued"] = True
        return event


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """A launch entered the admission queue, left it to start, or was taken out of it."""

    type: EventType  # QUEUED, ADMITTED or CANCELLED
    subprocess_id: str
    agent_type: str
    request_mb: float
    priority: int
    reason: str
    position: int | None = None  # in the queue (queued)
    pid: int | None = None  # of the started agent (admitted)
    at: datetime = field(default_factory=_now)
    owner_uid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "subprocess_id": self.subprocess_id,
            "agent_type": self.agent_type,
            "request_mb": self.request_mb,
            "priority": self.priority,
            "position": self.position,
            "pid": self.pid,
            "reason": self.reason,
            **timestamps(self.at),
        }


@dataclass(frozen=True, slots=True)
class RestartEvent:
    """A restart policy at work: the next run is due (``restarting``, after ``delay_s``),
    it started (``restarted``), or no run comes again (``restart_limit``)."""

    type: EventType  # RESTARTING, RESTARTED or RESTART_LIMIT
    subprocess_id: str
    agent_type: str
    run: int  # restarting, restart_limit: the run that ended; restarted: the new one
    reason: str  # why the run before ended (an EndReason value), or what was asked
    message: str
    delay_s: float | None = None  # restarting
    pid: int | None = None  # restarted
    exit_code: int | None = None  # of the run that ended
    at: datetime = field(default_factory=_now)
    owner_uid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "subprocess_id": self.subprocess_id,
            "agent_type": self.agent_type,
            "run": self.run,
            "restarts": self.run - 1,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "delay_s": self.delay_s,
            "pid": self.pid,
            "message": self.message,
            **timestamps(self.at),
        }


Event = LaunchEvent | AlertEvent | ExitEvent | QueueEvent | RestartEvent
