"""The bookkeeping of one sample (core.tracker), with explicit times like the policy's tests."""

from __future__ import annotations

import signal

import pytest

from supervisord.core import cadence
from supervisord.core.kinds import AlertKind, EndReason, Level
from supervisord.core.limits import Limits
from supervisord.core.policy import AgentState, Alert, Signal
from supervisord.core.tracker import Tracking, apply_sample

LIMITS = Limits(warning_mb=100.0, critical_mb=200.0, max_mb=1000.0, term_grace_s=2.0)


def test_the_first_sample_sets_start_end_and_the_growth_clock() -> None:
    step = apply_sample(AgentState(started_at=0.0), Tracking(), LIMITS, 0.5, 40.0)
    assert step.actions == []
    assert not step.skipped
    assert (step.tracking.start_mb, step.tracking.end_mb) == (40.0, 40.0)
    assert step.tracking.growth == cadence.Growth(at=0.5, mb=40.0)
    assert (step.state.current_mb, step.state.peak_mb) == (40.0, 40.0)
    later = apply_sample(step.state, step.tracking, LIMITS, 1.5, 60.0)
    assert later.tracking.start_mb == 40.0  # the first figure stays
    assert later.tracking.end_mb == 60.0
    assert later.tracking.growth is not None
    assert later.tracking.growth.slope_mb_s == pytest.approx(20.0)


def test_an_idle_agent_the_kernel_saw_not_move_is_skipped_but_its_clock_advances() -> None:
    state, tracking, _, _ = apply_sample(AgentState(started_at=0.0), Tracking(), LIMITS, 1.0, 40.0)
    step = apply_sample(state, tracking, LIMITS, 3.0, 40.0, unchanged=True)
    assert step.skipped
    assert step.state is state  # the policy was not stepped
    assert step.tracking.growth is not None
    assert step.tracking.growth.at == 3.0
    assert step.tracking.start_mb == 40.0
    # Not skipped once the agent's own process has ended: its leftovers need the policy.
    assert not apply_sample(state, tracking, LIMITS, 3.0, 40.0, unchanged=True, exited=True).skipped
    # Nor with a clock running on it (a timeout), nor above a threshold.
    timed = Limits(**{**LIMITS.as_dict(), "timeout_s": 60.0})
    assert not apply_sample(state, tracking, timed, 3.0, 40.0, unchanged=True).skipped
    warned, tracked, _, _ = apply_sample(state, tracking, LIMITS, 4.0, 150.0)
    assert warned.level is Level.WARNING
    assert not apply_sample(warned, tracked, LIMITS, 6.0, 150.0, unchanged=True).skipped


def test_the_crossing_of_max_mb_is_placed_between_the_two_samples() -> None:
    state, tracking, _, _ = apply_sample(
        AgentState(started_at=0.0), Tracking(), LIMITS, 10.0, 500.0
    )
    step = apply_sample(state, tracking, LIMITS, 11.0, 1500.0)
    assert step.tracking.crossed_at == pytest.approx(10.5)
    assert Signal(signal.SIGTERM, EndReason.MEMORY_LIMIT) in step.actions
    kinds = [a.kind for a in step.actions if isinstance(a, Alert)]
    assert AlertKind.SIGTERM_SENT in kinds
    assert step.state.ending is EndReason.MEMORY_LIMIT
    # Later samples above the limit keep the first crossing.
    again = apply_sample(step.state, step.tracking, LIMITS, 11.1, 1600.0)
    assert again.tracking.crossed_at == pytest.approx(10.5)


def test_a_tree_read_as_zero_keeps_its_last_memory_and_an_empty_tree_is_a_time_tick() -> None:
    state, tracking, _, _ = apply_sample(AgentState(started_at=0.0), Tracking(), LIMITS, 1.0, 80.0)
    dying = apply_sample(state, tracking, LIMITS, 2.0, 0.0)
    assert dying.tracking.end_mb == 80.0
    # No member left: nothing measured, only the policy's clocks (here a timeout) move.
    timed = Limits(**{**LIMITS.as_dict(), "timeout_s": 5.0})
    gone = apply_sample(dying.state, dying.tracking, timed, 5.0, None)
    assert gone.tracking == dying.tracking
    assert Signal(signal.SIGTERM, EndReason.TIMEOUT) in gone.actions
    assert gone.state.ending is EndReason.TIMEOUT
