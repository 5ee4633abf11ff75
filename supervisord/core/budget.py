"""The host's memory budget: what every agent together may use, who gets in, who is shed.

Pure, as the policy is: figures in, decisions out. The model is Kubernetes' on one host. A
running agent holds ``max(used, request)`` of the budget (what it uses, or what it asked for
and may still grow into); a launch is admitted when its request fits beside those and the
memory left available stays above the reserve. Under pressure one agent is shed: the lowest
priority, then the fastest grower, then the youngest (the least work lost).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

# The reserve's default: a tenth of the memory the agents share, but never under this.
RESERVE_FRACTION = 0.10
RESERVE_FLOOR_MB = 512.0


@dataclass(frozen=True, slots=True)
class Budget:
    """The ``[host]`` section as resolved against this host's memory."""

    budget_mb: float
    reserve_mb: float
    # Shed when the "some" share of memory stall over 10 s passes this percentage.
    psi_some_avg10: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "budget_mb": round(self.budget_mb, 1),
            "reserve_mb": round(self.reserve_mb, 1),
            "pressure_psi_some_avg10": self.psi_some_avg10,
        }


def resolve(
    total_mb: float,
    *,
    budget_mb: float | None = None,
    reserve_mb: float | None = None,
    psi_some_avg10: float | None = None,
) -> Budget:
    """The budget for a host with ``total_mb`` (MemTotal, or the daemon's enclosing cgroup
    limit when that is smaller): what is not set follows from what is."""
    reserve = (
        reserve_mb if reserve_mb is not None else max(RESERVE_FRACTION * total_mb, RESERVE_FLOOR_MB)
    )
    budget = budget_mb if budget_mb is not None else max(total_mb - reserve, 0.0)
    return Budget(budget, reserve, psi_some_avg10)


@dataclass(frozen=True, slots=True)
class Claim:
    """A running agent's hold on the budget."""

    subprocess_id: str
    used_mb: float
    request_mb: float
    priority: int = 0
    growth_mb_s: float | None = None
    age_s: float = 0.0
    # Being ended already: it counts, but is no one to shed.
    ending: bool = False

    @property
    def held_mb(self) -> float:
        return max(self.used_mb, self.request_mb)

    @property
    def unused_mb(self) -> float:
        """What it asked for and has not yet used: room it may still take."""
        return max(self.request_mb - self.used_mb, 0.0)


@dataclass(frozen=True, slots=True)
class Usage:
    """The budget's figures now, for ``status``, ``top`` and metrics."""

    used_mb: float
    requested_mb: float
    held_mb: float

    @classmethod
    def of(cls, claims: Iterable[Claim]) -> Usage:
        claims = list(claims)
        return cls(
            used_mb=round(sum(c.used_mb for c in claims), 1),
            requested_mb=round(sum(c.request_mb for c in claims), 1),
            held_mb=round(sum(c.held_mb for c in claims), 1),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    fits: bool
    # Why it must wait (empty when it fits), in words a user can act on.
    reason: str = ""


def admit(
    budget: Budget, claims: Iterable[Claim], request_mb: float, available_mb: float
) -> Verdict:
    """Whether a launch asking ``request_mb`` fits now."""
    claims = list(claims)
    held = sum(c.held_mb for c in claims)
    free = budget.budget_mb - held
    if request_mb > free:
        return Verdict(
            False,
            f"needs {request_mb:g} MB; {max(free, 0.0):.0f} MB of the {budget.budget_mb:.0f} MB "
            f"budget is free ({held:.0f} MB held by {len(claims)} running agent(s))",
        )
    left = available_mb - sum(c.unused_mb for c in claims) - request_mb
    if left < budget.reserve_mb:
        return Verdict(
            False,
            f"needs {request_mb:g} MB; that would leave {left:.0f} MB available, below the "
            f"reserve of {budget.reserve_mb:.0f} MB",
        )
    return Verdict(True)


def never_fits(budget: Budget, request_mb: float) -> str | None:
    """Why a request can never be admitted, if so: it is over the whole budget."""
    if request_mb <= budget.budget_mb:
        return None
    return (
        f"it needs {request_mb:.0f} MB (request_mb, else the p90 peak of its type's runs, else "
        f"warning_mb), over the host's budget of {budget.budget_mb:.0f} MB: it could never be "
        "admitted (lower request_mb, or raise [host] budget_mb)"
    )


class Trigger(StrEnum):
    """What made the host be under pressure."""

    BUDGET = "budget"
    RESERVE = "reserve"
    PSI = "psi"


@dataclass(frozen=True, slots=True)
class Pressure:
    trigger: Trigger
    message: str
    agents_mb: float
    available_mb: float
    psi_some_avg10: float | None

    def figures(self, budget: Budget) -> dict[str, float | str | None]:
        return {
            "trigger": self.trigger.value,
            "agents_mb": round(self.agents_mb, 1),
            "available_mb": round(self.available_mb, 1),
            "psi_some_avg10": self.psi_some_avg10,
            **budget.as_dict(),
        }


def pressure(
    budget: Budget, agents_mb: float, available_mb: float, psi_some_avg10: float | None = None
) -> Pressure | None:
    """Whether the host is under pressure: the agents over their budget, available memory
    under the reserve, or memory stalls over the PSI threshold."""
    if agents_mb > budget.budget_mb:
        trigger = Trigger.BUDGET
        message = f"agents use {agents_mb:.1f} MB, over the host budget of {budget.budget_mb:g} MB"
    elif available_mb < budget.reserve_mb:
        trigger = Trigger.RESERVE
        message = (
            f"{available_mb:.1f} MB available is below the reserve of {budget.reserve_mb:g} MB"
        )
    elif (
        budget.psi_some_avg10 is not None
        and psi_some_avg10 is not None
        and psi_some_avg10 > budget.psi_some_avg10
    ):
        trigger = Trigger.PSI
        message = (
            f"memory pressure (PSI some avg10) {psi_some_avg10:.1f}% is over "
            f"{budget.psi_some_avg10:g}%"
        )
    else:
        return None
    return Pressure(trigger, message, agents_mb, available_mb, psi_some_avg10)


def shed_order(claims: Iterable[Claim]) -> list[Claim]:
    """Who goes first: lowest priority, then fastest recent growth, then the youngest."""
    candidates = [c for c in claims if not c.ending]
    return sorted(candidates, key=lambda c: (c.priority, -(c.growth_mb_s or 0.0), c.age_s))
