"""The admission queue: launches that wait for room in the host's memory budget.

Highest priority first, then first come first served, and strictly in that order: a large
launch at the head is not overtaken by smaller ones behind it, so it cannot starve. Each
waiting launch keeps the reason it waits, for ``claude-pm queue``; the queue is part of
run/state.json, so a daemon restart loses none of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from supervisord.config.host import HostSettings
from supervisord.core import budget as budgeting
from supervisord.core.budget import Budget, Claim, Verdict
from supervisord.core.clock import timestamps
from supervisord.core.errors import NotFoundError, QueueFull
from supervisord.core.events import QueueEvent
from supervisord.core.history import PeakHistory
from supervisord.core.kinds import EventType
from supervisord.core.limits import Limits
from supervisord.core.lineage import Lineage
from supervisord.core.scheduling import Scheduling
from supervisord.host.statefile import parse_entries
from supervisord.supervise.launchplan import LaunchRequest


@dataclass(frozen=True, slots=True)
class Waiting:
    """One launch in the queue, everything decided but the moment it starts."""

    subprocess_id: str
    request: LaunchRequest
    command: tuple[str, ...]
    scheduling: Scheduling
    request_mb: float
    seq: int
    queued_wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    reason: str = ""
    # Its session and runs so far: a restart or a requeue carries them to the next run.
    lineage: Lineage = field(default_factory=Lineage)

    @property
    def priority(self) -> int:
        return self.scheduling.priority

    def row(self, position: int) -> dict[str, Any]:
        """What ``queue`` lists of it."""
        return {
            "subprocess_id": self.subprocess_id,
            "agent_type": self.request.agent_type,
            "position": position,
            "priority": self.priority,
            "request_mb": self.request_mb,
            "queued_at": timestamps(self.queued_wall)["timestamp"],
            "reason": self.reason,
            "owner_uid": self.request.owner_uid,
        }

    def as_dict(self, wall_offset: float) -> dict[str, Any]:
        """For run/state.json (``wall_offset``: see ``Lineage.as_dict``)."""
        return {
            "subprocess_id": self.subprocess_id,
            "request": self.request.as_dict(),
            "command": list(self.command),
            "scheduling": self.scheduling.as_dict(),
            "request_mb": self.request_mb,
            "queued_wall": self.queued_wall.isoformat(),
            "lineage": self.lineage.as_dict(wall_offset),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], seq: int, wall_offset: float = 0.0) -> Waiting:
        return cls(
            subprocess_id=data["subprocess_id"],
            request=LaunchRequest.from_dict(data["request"]),
            command=tuple(data["command"]),
            scheduling=Scheduling(**data["scheduling"]),
            request_mb=float(data["request_mb"]),
            seq=seq,
            queued_wall=datetime.fromisoformat(data["queued_wall"]),
            lineage=Lineage.from_dict(data.get("lineage"), wall_offset),
        )


def queue_event(
    kind: EventType,
    waiting: Waiting,
    reason: str,
    *,
    position: int | None = None,
    pid: int | None = None,
) -> QueueEvent:
    return QueueEvent(
        type=kind,
        subprocess_id=waiting.subprocess_id,
        agent_type=waiting.request.agent_type,
        request_mb=waiting.request_mb,
        priority=waiting.priority,
        reason=reason,
        position=position,
        pid=pid,
        owner_uid=waiting.request.owner_uid,
    )


def host_budget(settings: HostSettings, total_mb: float) -> Budget:
    """``[host]`` resolved for a host whose agents could share ``total_mb`` at most."""
    return budgeting.resolve(
        total_mb,
        budget_mb=settings.budget_mb,
        reserve_mb=settings.reserve_mb,
        psi_some_avg10=settings.pressure_psi_some_avg10,
    )


class Queued(NamedTuple):
    """What a launch that must wait became: its entry, and its place when it was queued."""

    waiting: Waiting
    position: int


class Admission:
    """The budget, the queue and the history that fills in requests nobody gave."""

    def __init__(self, budget: Budget, max_queued: int, history: PeakHistory) -> None:
        self.budget = budget
        self.max_queued = max_queued
        self.history = history
        self._queue: list[Waiting] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, subprocess_id: object) -> bool:
        return any(w.subprocess_id == subprocess_id for w in self._queue)

    def request_mb(self, agent_type: str, scheduling: Scheduling, limits: Limits) -> float:
        """What a launch is taken to need: its own figure, its type's p90 peak, its warning."""
        if scheduling.request_mb is not None:
            return scheduling.request_mb
        return self.history.request_mb(agent_type) or limits.warning_mb

    def waiting(
        self,
        subprocess_id: str,
        request: LaunchRequest,
        command: tuple[str, ...],
        scheduling: Scheduling,
        request_mb: float,
        lineage: Lineage | None = None,
    ) -> Waiting:
        self._seq += 1
        return Waiting(
            subprocess_id,
            request,
            command,
            scheduling,
            request_mb,
            self._seq,
            lineage=lineage or Lineage(),
        )

    def check(self, waiting: Waiting, claims: Iterable[Claim], available_mb: float) -> Verdict:
        """Whether it may start now: it fits, and nothing waits ahead of it."""
        ahead = [w for w in self._queue if w.priority >= waiting.priority]
        if ahead:
            return Verdict(False, f"behind {len(ahead)} queued launch(es) of priority >= its own")
        return budgeting.admit(self.budget, claims, waiting.request_mb, available_mb)

    def enqueue(self, waiting: Waiting, reason: str) -> int:
        """Add it in its place; returns its position (1 = next)."""
        if len(self._queue) >= self.max_queued:
            raise QueueFull(
                f"the admission queue is full ({self.max_queued} launches wait; "
                "[host] max_queued): try again later, or cancel some with `claude-pm cancel`"
            )
        self._queue.append(replace(waiting, reason=reason))
        self._queue.sort(key=lambda w: (-w.priority, w.seq))
        return self.position(waiting.subprocess_id)

    def restore(
        self, entries: Iterable[Mapping[str, Any]], wall_offset: float = 0.0
    ) -> tuple[list[Waiting], list[str]]:
        """Launches a previous daemon left waiting, in their order; and a problem per entry
        that could not be read."""
        first = self._seq + 1
        restored, problems = parse_entries(
            entries,
            lambda entry, n: Waiting.from_dict(entry, first + n, wall_offset),
            "queued launch",
        )
        self._seq += len(restored) + len(problems)
        for waiting in restored:
            self._queue.append(replace(waiting, reason="restored from run/state.json"))
        self._queue.sort(key=lambda w: (-w.priority, w.seq))
        return restored, problems

    def position(self, subprocess_id: str) -> int:
        for n, waiting in enumerate(self._queue, 1):
            if waiting.subprocess_id == subprocess_id:
                return n
        raise NotFoundError(f"no queued launch {subprocess_id}")

    def get(self, subprocess_id: str) -> Waiting:
        return self._queue[self.position(subprocess_id) - 1]

    def cancel(self, subprocess_id: str) -> Waiting:
        waiting = self.get(subprocess_id)
        self._queue.remove(waiting)
        return waiting

    def next_ready(self, claims: Iterable[Claim], available_mb: float) -> Waiting | None:
        """Take the head of the queue if it fits now; the reasons of all who wait are renewed."""
        if not self._queue:
            return None
        head = self._queue[0]
        verdict = budgeting.admit(self.budget, claims, head.request_mb, available_mb)
        if verdict.fits:
            return self._queue.pop(0)
        behind = f"behind {head.subprocess_id}, which {verdict.reason}"
        self._queue = [replace(head, reason=verdict.reason)] + [
            replace(w, reason=behind) for w in self._queue[1:]
        ]
        return None

    def rows(self, owner_uid: int | None = None) -> list[dict[str, Any]]:
        return [
            w.row(n)
            for n, w in enumerate(self._queue, 1)
            if owner_uid is None or w.request.owner_uid == owner_uid
        ]

    def entries(self, wall_offset: float) -> list[dict[str, Any]]:
        return [w.as_dict(wall_offset) for w in self._queue]
