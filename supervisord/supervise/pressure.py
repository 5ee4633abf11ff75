"""Shedding: when the host runs short, one agent is stopped, the one the budget ranks last.

Checked after every sample. One agent at a time: while a shed agent is still ending nothing
else is shed, and the next check, with that agent's memory given back, decides anew.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from supervisord.core import budget as budgeting
from supervisord.core.budget import Budget, Claim, Pressure
from supervisord.host import psi


@dataclass(frozen=True, slots=True)
class Shed:
    victim: Claim
    pressure: Pressure


class HostGuard:
    def __init__(self, psi_path: Path = psi.SYSTEM_PSI) -> None:
        self.psi_path = psi_path
        self.shedding: str | None = None
        self.sheds: Counter[str] = Counter()

    def check(
        self,
        budget: Budget,
        used_mb: float,
        available_mb: float,
        claims: Callable[[], Iterable[Claim]],
        alive: Callable[[str], bool],
    ) -> Shed | None:
        """The agent to shed now, if any. ``used_mb``: every agent's memory together;
        ``claims`` is asked only under pressure; ``alive`` says whether an agent still runs."""
        if self.shedding is not None and alive(self.shedding):
            return None
        self.shedding = None
        level = psi.some_avg10(self.psi_path) if budget.psi_some_avg10 is not None else None
        found = budgeting.pressure(budget, used_mb, available_mb, level)
        if found is None:
            return None
        order = budgeting.shed_order(claims())
        if not order:
            return None
        victim = order[0]
        self.shedding = victim.subprocess_id
        self.sheds[found.trigger.value] += 1
        return Shed(victim, found)
