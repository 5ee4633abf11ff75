"""One supervised agent: what the supervisor knows of it, and the records it produces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import anyio

from supervisord import cadence, policy
from supervisord.cadence import Growth
from supervisord.cgroup import AgentCgroup
from supervisord.config import Limits
from supervisord.eventlog import timestamps
from supervisord.events import EndReason, Level
from supervisord.launcher import UNKNOWN_EXIT, Child, ExitStatus
from supervisord.sampler import Identity
from supervisord.state import AgentRecord
from supervisord.state import as_dict as state_as_dict


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
    start_mb: float | None = None
    end_mb: float = 0.0
    exit: ExitStatus | None = None
    record: dict[str, Any] | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    growth: Growth | None = None
    next_due: float = 0.0
    crossed_at: float | None = None  # when the tree most likely crossed max_mb
    signalled_at: float | None = None  # when the first SIGTERM (or SIGKILL) went out
    cgroup: AgentCgroup | None = None
    cgroup_scope: anyio.CancelScope | None = None
    _entry_key: tuple[Any, ...] | None = None
    _entry: dict[str, Any] | None = None

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
            "start_mb": self.start_mb,
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
            **self.projection(),
        }

    def projection(self) -> dict[str, float | None]:
        """Growth rate and time to the hard limit at that rate (None: not growing)."""
        if self.growth is None:
            return {"growth_mb_s": None, "time_to_limit_s": None}
        eta = cadence.time_to(self.growth, self.limits.max_mb)
        return {
            "growth_mb_s": round(self.growth.rate_mb_s, 1),
            "time_to_limit_s": None if eta is None else round(eta, 1),
        }

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
        }

    def end_record(self, now: float) -> dict[str, Any]:
        """The subprocess-stats.jsonl record, once the tree is gone."""
        reason = self.state.ending or EndReason.EXITED
        exit_status = self.exit or UNKNOWN_EXIT
        return stats_record(
            self.id,
            self.agent_type,
            self.child.pid,
            list(self.command),
            exit_status,
            reason,
            memory={
                "start_mb": self.start_mb if self.start_mb is not None else 0.0,
                "peak_mb": round(self.state.peak_mb, 1),
                "end_mb": round(self.end_mb, 1),
                "duration_seconds": round(now - self.state.started_at, 1),
                "warnings": list(self.state.warnings),
            },
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
            self.members,
            self.start_mb,
            self.limits,
        )
        if key != self._entry_key or self._entry is None:
            self._entry_key, self._entry = key, state_as_dict(self.snapshot())
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
            start_mb=self.start_mb,
            peak_mb=round(self.state.peak_mb, 1),
            end_mb=round(self.end_mb, 1),
            warnings=list(self.state.warnings),
            level=self.state.level.name,
            ending=None if self.state.ending is None else self.state.ending.value,
            members=[[pid, start] for pid, start in self.members],
        )

    @classmethod
    def restore(cls, record: AgentRecord, child: Child, limits: Limits, now: float) -> Agent:
        """An agent a previous daemon left running, as that daemon last saw it."""
        started_wall = datetime.fromisoformat(record.started_wall)
        age_s = max(0.0, (datetime.now(UTC) - started_wall).total_seconds())
        state = policy.AgentState(
            started_at=now - age_s,
            level=Level[record.level],
            peak_mb=record.peak_mb,
            current_mb=record.end_mb,
            warnings=tuple(record.warnings),
        )
        if record.ending is not None:
            # It was being stopped: the escalation starts over (SIGTERM, then grace).
            state, _ = policy.request_end(state, now, EndReason(record.ending), limits.term_grace_s)
            state = replace(state, term_sent_at=now)
        return cls(
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
            start_mb=record.start_mb,
            end_mb=record.end_mb,
        )


def lost_record(record: AgentRecord) -> dict[str, Any]:
    """The record of an agent that ended while no daemon was watching it."""
    started = datetime.fromisoformat(record.started_wall)
    return stats_record(
        record.subprocess_id,
        record.agent_type,
        record.pid,
        record.command,
        UNKNOWN_EXIT,
        EndReason.LOST,
        memory={
            "start_mb": record.start_mb if record.start_mb is not None else 0.0,
            "peak_mb": record.peak_mb,
            "end_mb": record.end_mb,
            # Unknown when exactly it ended: up to now at most.
            "duration_seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
            "warnings": record.warnings,
        },
    )


def stats_record(
    subprocess_id: str,
    agent_type: str,
    pid: int,
    command: list[str],
    exit_status: ExitStatus,
    reason: EndReason,
    memory: dict[str, Any],
) -> dict[str, Any]:
    return {
        "subprocess_id": subprocess_id,
        "agent_type": agent_type,
        "pid": pid,
        "command": command,
        "exit_code": exit_status.exit_code,
        "signal": exit_status.signal,
        "reason": reason.value,
        "memory_stats": {**memory, "aborted": reason.aborted},
        **timestamps(),
    }
