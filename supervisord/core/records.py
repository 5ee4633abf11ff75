"""What the daemon keeps of an agent across its own restarts, and the record of one it lost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from supervisord.core.events import ExitEvent, MemoryStats
from supervisord.core.kinds import EndReason


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """One live agent, as much as a new daemon needs to carry on supervising it."""

    subprocess_id: str
    agent_type: str
    command: list[str]
    pid: int
    start: int
    started_wall: str  # ISO 8601 UTC
    limits: dict[str, Any]
    overrides: dict[str, Any]
    owner_uid: int | None = None
    start_mb: float | None = None
    peak_mb: float = 0.0
    end_mb: float = 0.0
    warnings: list[str] = field(default_factory=list)
    level: str = "OK"
    ending: str | None = None
    members: list[list[int]] = field(default_factory=list)
    # An escalation under way: when the first signal went out (ISO 8601 UTC), its grace, and
    # whether SIGKILL followed, so a new daemon finishes it rather than starting over.
    term_sent_wall: str | None = None
    grace_s: float | None = None
    kill_sent: bool = False
    # Its share of the host's budget, and the launch itself (to queue it again when shed
    # with on_pressure = "requeue").
    scheduling: dict[str, Any] = field(default_factory=dict)
    request_mb: float | None = None
    launch: dict[str, Any] | None = None
    # Across runs: the command before this run's placeholders, and its lineage (session,
    # run number, run starts as wall-clock seconds; see core.lineage).
    template: list[str] | None = None
    lineage: dict[str, Any] | None = None
    # Adopted by `watch`, and the group (as /proc names it) its tree goes back to on unwatch.
    watched: bool = False
    origin: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lost_event(record: AgentRecord, now: datetime | None = None) -> ExitEvent:
    """The end of an agent that ended while no daemon was watching it."""
    now = now or datetime.now(UTC)
    started = datetime.fromisoformat(record.started_wall)
    return ExitEvent(
        subprocess_id=record.subprocess_id,
        agent_type=record.agent_type,
        pid=record.pid,
        command=tuple(record.command),
        exit_code=None,
        signal=None,
        reason=EndReason.LOST,
        memory=MemoryStats(
            start_mb=record.start_mb if record.start_mb is not None else 0.0,
            peak_mb=record.peak_mb,
            end_mb=record.end_mb,
            # Unknown when exactly it ended: up to now at most.
            duration_seconds=round((now - started).total_seconds(), 1),
            warnings=tuple(record.warnings),
            aborted=EndReason.LOST.aborted,
        ),
        at=now,
        owner_uid=record.owner_uid,
        run=int((record.lineage or {}).get("run", 1)),
    )
