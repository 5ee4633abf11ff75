"""Runs that are due again: an agent whose run ended and whose restart policy brings it back.

Each waits out its delay here (a wall-clock due time in run/state.json, so a daemon that
crashed meanwhile starts it as soon as it is back), then goes through admission like any
launch, with its subprocess id, session and run count carried along.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from supervisord.core.errors import NotFoundError
from supervisord.host.statefile import parse_entries
from supervisord.supervise.admission import Waiting


@dataclass(slots=True)
class Pending:
    """The next run of one agent, and when it is due (the engine's clock)."""

    waiting: Waiting
    due: float
    reason: str  # why the run before ended
    delay_s: float
    last: dict[str, Any]  # the stats record of the run before (what `stop` answers with)
    # False while the run before still has its cgroup, which the next run's name needs.
    ready: bool = True

    @property
    def subprocess_id(self) -> str:
        return self.waiting.subprocess_id

    def row(self, now: float) -> dict[str, Any]:
        """What ``queue`` lists of it."""
        due_in = max(0.0, self.due - now)
        run = self.waiting.lineage.run
        return {
            **self.waiting.row(0),
            "position": None,
            "state": "restarting",
            "run": run,
            "restarts": run - 1,
            "due_in_s": round(due_in, 1),
            "reason": f"run {run} due in {due_in:.1f} s (run {run - 1} ended: {self.reason})",
        }

    def as_dict(self, wall_offset: float) -> dict[str, Any]:
        return {
            "waiting": self.waiting.as_dict(wall_offset),
            "due_wall": round(self.due + wall_offset, 3),
            "reason": self.reason,
            "delay_s": self.delay_s,
            "last": self.last,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], seq: int, wall_offset: float) -> Pending:
        return cls(
            waiting=Waiting.from_dict(data["waiting"], seq, wall_offset),
            due=float(data["due_wall"]) - wall_offset,
            reason=str(data["reason"]),
            delay_s=float(data["delay_s"]),
            last=dict(data.get("last") or {}),
        )


class Restarts:
    """Every run that waits for its delay, by subprocess id."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, subprocess_id: object) -> bool:
        return subprocess_id in self._pending

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._pending.values()))

    def add(self, pending: Pending) -> None:
        self._pending[pending.subprocess_id] = pending

    def get(self, subprocess_id: str) -> Pending:
        try:
            return self._pending[subprocess_id]
        except KeyError:
            raise NotFoundError(f"no restart pending for {subprocess_id}") from None

    def cancel(self, subprocess_id: str) -> Pending:
        pending = self.get(subprocess_id)
        del self._pending[subprocess_id]
        return pending

    def take_due(self, now: float) -> list[Pending]:
        """The runs due by ``now`` (and ready), taken out, the earliest first."""
        due = sorted(
            (p for p in self._pending.values() if p.ready and p.due <= now), key=lambda p: p.due
        )
        for pending in due:
            del self._pending[pending.subprocess_id]
        return due

    def wait_s(self, now: float) -> float:
        """Until the next run is due (inf: none waits)."""
        dues = [p.due for p in self._pending.values() if p.ready]
        return max(0.0, min(dues) - now) if dues else float("inf")

    def rows(self, now: float, owner_uid: int | None = None) -> list[dict[str, Any]]:
        return [
            p.row(now)
            for p in sorted(self._pending.values(), key=lambda p: p.due)
            if owner_uid is None or p.waiting.request.owner_uid == owner_uid
        ]

    def entries(self, wall_offset: float) -> list[dict[str, Any]]:
        return [p.as_dict(wall_offset) for p in self._pending.values()]

    def restore(
        self, entries: Iterable[Mapping[str, Any]], first_seq: int, wall_offset: float
    ) -> list[str]:
        """Runs a previous daemon left due; returns a problem per entry it could not read."""
        restored, problems = parse_entries(
            entries,
            lambda entry, n: Pending.from_dict(entry, first_seq + n, wall_offset),
            "pending restart",
        )
        for pending in restored:
            self.add(pending)
        return problems
