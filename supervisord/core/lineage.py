"""One agent's identity across its runs: its session, which run it is on, when runs started.

The subprocess id stays the same from run to run; so does ``session_uuid``, generated once
per agent for ``{session_uuid}``. ``session_id`` is what the agent printed of its own (see
``core.resume``). Run start times are the caller's monotonic clock; in run/state.json they
are wall-clock seconds, so that a new daemon (a new monotonic origin) keeps the window.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from supervisord.core.restart import Runs


def _new_uuid() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Lineage:
    session_uuid: str = field(default_factory=_new_uuid)
    session_id: str | None = None
    runs: Runs = field(default_factory=Runs)

    @property
    def run(self) -> int:
        return self.runs.run

    def values(self, subprocess_id: str, task: str | None) -> dict[str, str | None]:
        """The placeholders' values for this run (None: not known yet)."""
        return {
            "task": task or "",
            "subprocess_id": subprocess_id,
            "run": str(self.run),
            "session_uuid": self.session_uuid,
            "session_id": self.session_id,
        }

    def captured(self, session_id: str | None) -> Lineage:
        """With the id the run just printed (None keeps the one before)."""
        return self if session_id is None else replace(self, session_id=session_id)

    def following(self, started_at: float, *, streak: int | None = None) -> Lineage:
        """For the run after the one that started at ``started_at``."""
        runs = self.runs
        return replace(
            self,
            runs=Runs(
                run=runs.run + 1,
                streak=runs.streak if streak is None else streak,
                starts=(*runs.starts, started_at),
            ),
        )

    def as_dict(self, wall_offset: float) -> dict[str, Any]:
        """For run/state.json; ``wall_offset`` = wall-clock time minus the caller's clock."""
        return {
            "session_uuid": self.session_uuid,
            "session_id": self.session_id,
            "run": self.runs.run,
            "streak": self.runs.streak,
            "starts_wall": [round(t + wall_offset, 3) for t in self.runs.starts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, wall_offset: float) -> Lineage:
        """The lineage state.json kept (a fresh one for an entry from before restarts)."""
        if not data:
            return cls()
        runs = Runs(
            run=int(data.get("run", 1)),
            streak=int(data.get("streak", 0)),
            starts=tuple(float(t) - wall_offset for t in data.get("starts_wall", ())),
        )
        session_id = data.get("session_id")
        return cls(
            session_uuid=str(data.get("session_uuid") or _new_uuid()),
            session_id=None if session_id is None else str(session_id),
            runs=runs,
        )
