"""Launches that wait for other agents (pueue's ``--after``), and how agents ended for good.

A launch given ``after`` starts once each of those agents has ended for good with exit code
0 ("for good": no restart follows). If one of them ends for good any other way, the waiting
launch is cancelled, and so, in turn, is everything that waited for it. How recent agents
ended is remembered (a bounded number), so that ``--after`` an agent that already ended
is decided at once, and ``status`` can list the agents whose restarts gave up (``failed``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from supervisord.core.clock import timestamps
from supervisord.core.errors import NotFoundError
from supervisord.host.statefile import parse_entries
from supervisord.supervise.admission import Waiting

MAX_OUTCOMES = 256


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one agent ended for good."""

    subprocess_id: str
    agent_type: str
    ok: bool  # by itself, with exit code 0
    why: str  # for people: "exited with exit code 1", "restart_limit: ..."
    failed: bool = False  # its restarts gave up (restart_limit)
    owner_uid: int | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # A failed agent's next run, should someone `restart` it (as `systemctl restart` does a
    # unit that hit its start limit).
    again: Waiting | None = None

    def as_dict(self, wall_offset: float) -> dict[str, Any]:
        """For run/state.json: ``--after`` and ``restart`` of a failed agent outlive the daemon."""
        return {
            "subprocess_id": self.subprocess_id,
            "agent_type": self.agent_type,
            "ok": self.ok,
            "why": self.why,
            "failed": self.failed,
            "owner_uid": self.owner_uid,
            "at": self.at.isoformat(),
            "again": None if self.again is None else self.again.as_dict(wall_offset),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], seq: int, wall_offset: float) -> Outcome:
        again = data.get("again")
        return cls(
            subprocess_id=str(data["subprocess_id"]),
            agent_type=str(data["agent_type"]),
            ok=bool(data["ok"]),
            why=str(data["why"]),
            failed=bool(data.get("failed", False)),
            owner_uid=data.get("owner_uid"),
            at=datetime.fromisoformat(data["at"]),
            again=None if again is None else Waiting.from_dict(again, seq, wall_offset),
        )

    def row(self) -> dict[str, Any]:
        return {
            "subprocess_id": self.subprocess_id,
            "agent_type": self.agent_type,
            "status": "FAILED" if self.failed else ("OK" if self.ok else "ENDED"),
            "reason": self.why,
            "ended_at": timestamps(self.at)["timestamp"],
        }


@dataclass(slots=True)
class AfterWait:
    waiting: Waiting
    pending: list[str]  # the agents still to end with exit code 0, in the order given

    def row(self) -> dict[str, Any]:
        return {
            **self.waiting.row(0),
            "position": None,
            "state": "waiting",
            "after": list(self.waiting.request.after),
            "reason": f"waits for {', '.join(self.pending)} to end with exit code 0",
        }


class Dependencies:
    def __init__(self) -> None:
        self._waits: dict[str, AfterWait] = {}
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waits)

    def __contains__(self, subprocess_id: object) -> bool:
        return subprocess_id in self._waits

    def outcome(self, subprocess_id: str) -> Outcome | None:
        return self._outcomes.get(subprocess_id)

    def failed(self, owner_uid: int | None = None) -> list[dict[str, Any]]:
        """Agents whose restarts gave up, most recent last."""
        return [
            o.row()
            for o in self._outcomes.values()
            if o.failed and (owner_uid is None or o.owner_uid == owner_uid)
        ]

    def take_failed(self, subprocess_id: str) -> Outcome | None:
        """A failed agent that can run again, taken: once restarted it is no longer failed
        (``remember`` it again if it cannot start)."""
        outcome = self._outcomes.get(subprocess_id)
        if outcome is None or outcome.again is None:
            return None
        del self._outcomes[subprocess_id]
        return outcome

    def add(self, waiting: Waiting, pending: list[str]) -> None:
        self._waits[waiting.subprocess_id] = AfterWait(waiting, pending)

    def cancel(self, subprocess_id: str) -> Waiting:
        try:
            return self._waits.pop(subprocess_id).waiting
        except KeyError:
            raise NotFoundError(f"no launch {subprocess_id} waits for other agents") from None

    def get(self, subprocess_id: str) -> Waiting:
        try:
            return self._waits[subprocess_id].waiting
        except KeyError:
            raise NotFoundError(f"no launch {subprocess_id} waits for other agents") from None

    def ended(self, outcome: Outcome) -> tuple[list[Waiting], list[tuple[Waiting, str]]]:
        """One agent ended for good: the launches that may start now, and those cancelled
        (with why). The cancelled count as ended for good too: what waited for them goes."""
        ready: list[Waiting] = []
        cancelled: list[tuple[Waiting, str]] = []
        todo = [outcome]
        while todo:
            done = todo.pop()
            self.remember(done)
            for wait in list(self._waits.values()):
                if done.subprocess_id not in wait.pending:
                    continue
                if done.ok:
                    wait.pending.remove(done.subprocess_id)
                    if not wait.pending:
                        ready.append(self._waits.pop(wait.waiting.subprocess_id).waiting)
                    continue
                waiting = self._waits.pop(wait.waiting.subprocess_id).waiting
                why = f"{done.subprocess_id}, which it waited for, {done.why}"
                cancelled.append((waiting, why))
                todo.append(cancelled_outcome(waiting, why))
        return ready, cancelled

    def remember(self, outcome: Outcome) -> None:
        self._outcomes[outcome.subprocess_id] = outcome
        self._outcomes.move_to_end(outcome.subprocess_id)
        while len(self._outcomes) > MAX_OUTCOMES:
            self._outcomes.popitem(last=False)

    def rows(self, owner_uid: int | None = None) -> list[dict[str, Any]]:
        return [
            w.row()
            for w in self._waits.values()
            if owner_uid is None or w.waiting.request.owner_uid == owner_uid
        ]

    def ended_entries(self, wall_offset: float) -> list[dict[str, Any]]:
        return [o.as_dict(wall_offset) for o in self._outcomes.values()]

    def restore_ended(
        self, entries: Iterable[Mapping[str, Any]], first_seq: int, wall_offset: float
    ) -> list[str]:
        restored, problems = parse_entries(
            entries,
            lambda entry, n: Outcome.from_dict(entry, first_seq + n, wall_offset),
            "ended agent",
        )
        for outcome in restored:
            self.remember(outcome)
        return problems

    def entries(self, wall_offset: float) -> list[dict[str, Any]]:
        return [
            {"waiting": w.waiting.as_dict(wall_offset), "pending": list(w.pending)}
            for w in self._waits.values()
        ]

    def restore(
        self, entries: Iterable[Mapping[str, Any]], first_seq: int, wall_offset: float
    ) -> list[str]:
        def parse(entry: Mapping[str, Any], n: int) -> AfterWait:
            waiting = Waiting.from_dict(entry["waiting"], first_seq + n, wall_offset)
            return AfterWait(waiting, [str(sid) for sid in entry["pending"]])

        restored, problems = parse_entries(entries, parse, "launch waiting for others")
        for wait in restored:
            self._waits[wait.waiting.subprocess_id] = wait
        return problems


def cancelled_outcome(waiting: Waiting, why: str) -> Outcome:
    """A launch taken away before it ran has ended for good, not with exit code 0."""
    return Outcome(
        waiting.subprocess_id,
        waiting.request.agent_type,
        ok=False,
        why=f"was cancelled before it ran ({why})",
        owner_uid=waiting.request.owner_uid,
    )
