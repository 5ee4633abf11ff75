"""The bookkeeping of one sample, besides the policy's own state: first and last memory, the
growth rate, when the hard limit was most likely crossed.

Pure, with explicit times, like the policy it feeds: ``apply_sample`` takes what the sampler
measured and returns the next policy state, the next tracking and the actions to carry out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from supervisord.core import cadence, policy
from supervisord.core.cadence import Growth
from supervisord.core.kinds import Level
from supervisord.core.limits import Limits
from supervisord.core.policy import Action, AgentState


@dataclass(frozen=True, slots=True)
class Tracking:
    start_mb: float | None = None
    end_mb: float = 0.0
    growth: Growth | None = None
    crossed_at: float | None = None  # when the tree most likely crossed max_mb


class Step(NamedTuple):
    state: AgentState
    tracking: Tracking
    actions: list[Action]
    # The sample was taken as it came (an idle agent the kernel saw not move): only the
    # growth clock advanced, the tree's members are as they were.
    skipped: bool = False


def quiet(state: AgentState, limits: Limits, mb: float | None) -> bool:
    """Nothing the policy could do with this sample: an idle agent at the same memory, at
    level OK, with no clock running on it. Skipping the step saves most of the per-agent cost
    of a tick for a fleet of idle agents; the result would be the state it already has."""
    return (
        mb is not None
        and mb == state.current_mb
        and state.level is Level.OK
        and state.ending is None
        and limits.timeout_s is None
        and limits.predict_s is None
    )


def observe(tracking: Tracking, now: float, mb: float, max_mb: float) -> Tracking:
    """A sample of a tree that has members."""
    crossed_at = tracking.crossed_at
    if mb >= max_mb and crossed_at is None:
        crossed_at = cadence.crossing_time(tracking.growth, now, mb, max_mb)
    return Tracking(
        start_mb=mb if tracking.start_mb is None else tracking.start_mb,
        # A process being killed shows 0 for an instant before it is gone.
        end_mb=mb if mb > 0 else tracking.end_mb,
        growth=cadence.observe(tracking.growth, now, mb),
        crossed_at=crossed_at,
    )


def apply_sample(
    state: AgentState,
    tracking: Tracking,
    limits: Limits,
    now: float,
    mb: float | None,
    *,
    unchanged: bool = False,
    exited: bool = False,
) -> Step:
    """One sample at ``now``: ``mb`` of the tree, None when it has no live member left.

    ``unchanged``: the kernel's count for the agent's cgroup had not moved, so ``mb`` is the
    previous sample's figure. ``exited``: the agent's own process has ended.
    """
    if unchanged and not exited and quiet(state, limits, mb):
        assert mb is not None
        return Step(
            state, replace(tracking, growth=cadence.observe(tracking.growth, now, mb)), [], True
        )
    eta = None
    if mb is not None:
        tracking = observe(tracking, now, mb, limits.max_mb)
        eta = cadence.time_to(tracking.growth, limits.max_mb)
    if quiet(state, limits, mb):
        return Step(state, tracking, [])
    state, actions = policy.step(state, now, limits, mb, eta)
    return Step(state, tracking, actions)
