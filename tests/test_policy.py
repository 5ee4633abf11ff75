"""The escalation policy as a pure state machine: explicit timestamps, no clock, no processes."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord.core import policy
from supervisord.core.kinds import AlertKind, EndReason, Level
from supervisord.core.limits import Limits
from supervisord.core.policy import Action, AgentState, Alert, Signal

LIMITS = Limits()  # warning 1024, critical 2048, max 4096, term_grace_s 5
WARN_FLOOR = policy.HYSTERESIS * LIMITS.warning_mb  # 921.6: WARNING holds down to here
CRIT_FLOOR = policy.HYSTERESIS * LIMITS.critical_mb  # 1843.2: CRITICAL holds down to here
LEVEL_EVENTS = frozenset({AlertKind.MEMORY_WARNING, AlertKind.MEMORY_CRITICAL})
TERM = Signal(signal.SIGTERM, EndReason.MEMORY_LIMIT)
KILL = Signal(signal.SIGKILL, EndReason.MEMORY_LIMIT)


def fresh(started_at: float = 0.0) -> AgentState:
    return AgentState(started_at=started_at)


def alerts(actions: Sequence[Action]) -> list[Alert]:
    return [a for a in actions if isinstance(a, Alert)]


def signals(actions: Sequence[Action]) -> list[Signal]:
    return [a for a in actions if isinstance(a, Signal)]


def events(actions: Sequence[Action]) -> list[AlertKind]:
    return [a.kind for a in alerts(actions)]


def feed(
    state: AgentState,
    samples: Sequence[tuple[float, float | None]],
    limits: Limits = LIMITS,
) -> tuple[AgentState, list[Action]]:
    """Run ``(now, mb)`` samples through ``step``; returns the last state and all actions."""
    collected: list[Action] = []
    for now, mb in samples:
        state, actions = policy.step(state, now, limits, mb)
        collected.extend(actions)
    return state, collected


def at_warning(now: float = 0.0, mb: float = 1030.2) -> AgentState:
    state, actions = policy.step(fresh(), now, LIMITS, mb)
    assert state.level is Level.WARNING
    assert events(actions) == [AlertKind.MEMORY_WARNING]
    return state


def at_critical(now: float = 0.0, mb: float = 2107.4) -> AgentState:
    state, actions = policy.step(fresh(), now, LIMITS, mb)
    assert state.level is Level.CRITICAL
    assert events(actions) == [AlertKind.MEMORY_CRITICAL]
    return state


# -- levels rising --------------------------------------------------------------------------


@pytest.mark.parametrize("mb", [0.0, 41.0, 1023.9, 1023.99])
def test_below_warning_stays_ok_silently(mb: float) -> None:
    state, actions = policy.step(fresh(), 1.0, LIMITS, mb)
    assert actions == []
    assert state.level is Level.OK
    assert state.current_mb == mb
    assert state.warnings == ()
    assert state.last_alert_at is None


@pytest.mark.parametrize(
    ("mb", "event", "level", "threshold", "message"),
    [
        (
            1030.2,
            AlertKind.MEMORY_WARNING,
            Level.WARNING,
            1024.0,
            "WARNING: memory 1030.2 MB exceeds 1024 MB",
        ),
        (
            1024.0,
            AlertKind.MEMORY_WARNING,
            Level.WARNING,
            1024.0,
            "WARNING: memory 1024.0 MB exceeds 1024 MB",
        ),
        (
            2107.4,
            AlertKind.MEMORY_CRITICAL,
            Level.CRITICAL,
            2048.0,
            "CRITICAL: memory 2107.4 MB exceeds 2048 MB",
        ),
        (
            2048.0,
            AlertKind.MEMORY_CRITICAL,
            Level.CRITICAL,
            2048.0,
            "CRITICAL: memory 2048.0 MB exceeds 2048 MB",
        ),
    ],
)
def test_entering_a_level_from_ok_alerts_once(
    mb: float, event: AlertKind, level: Level, threshold: float, message: str
) -> None:
    state, actions = policy.step(fresh(), 3.0, LIMITS, mb)
    expected = Alert(kind=event, current_mb=mb, threshold_mb=threshold, message=message)
    assert actions == [expected]
    assert expected.level is level
    assert state.level is level
    assert state.last_alert_at == 3.0
    assert state.warnings == (message,)
    assert state.ending is None


def test_warning_then_critical_alerts_on_each_entry() -> None:
    state = at_warning(0.0)
    state, actions = policy.step(state, 2.0, LIMITS, 2107.4)
    assert actions == [
        Alert(
            AlertKind.MEMORY_CRITICAL,
            2107.4,
            2048.0,
            "CRITICAL: memory 2107.4 MB exceeds 2048 MB",
        )
    ]
    assert state.level is Level.CRITICAL
    assert state.last_alert_at == 2.0
    assert state.warnings == (
        "WARNING: memory 1030.2 MB exceeds 1024 MB",
        "CRITICAL: memory 2107.4 MB exceeds 2048 MB",
    )


def test_jump_from_ok_to_critical_gives_one_critical_alert_only() -> None:
    state, actions = policy.step(fresh(), 0.0, LIMITS, 3000.0)
    assert events(actions) == [AlertKind.MEMORY_CRITICAL]
    assert signals(actions) == []
    assert state.warnings == ("CRITICAL: memory 3000.0 MB exceeds 2048 MB",)


@pytest.mark.parametrize(
    ("entry_mb", "held_mb"),
    [(1030.2, 1100.0), (1030.2, 2047.9), (2107.4, 2200.0), (2107.4, 4095.9)],
)
def test_no_duplicate_alert_on_the_next_samples(entry_mb: float, held_mb: float) -> None:
    state, first = policy.step(fresh(), 0.0, LIMITS, entry_mb)
    assert len(alerts(first)) == 1
    state, actions = feed(state, [(2.0, held_mb), (4.0, held_mb), (30.0, entry_mb)])
    assert actions == []
    assert state.last_alert_at == 0.0
    assert len(state.warnings) == 1


@pytest.mark.parametrize(
    ("entry_mb", "held_mb", "event", "message"),
    [
        (
            1030.2,
            1100.0,
            AlertKind.MEMORY_WARNING,
            "WARNING: memory 1100.0 MB exceeds 1024 MB (held)",
        ),
        (
            2107.4,
            2500.0,
            AlertKind.MEMORY_CRITICAL,
            "CRITICAL: memory 2500.0 MB exceeds 2048 MB (held)",
        ),
    ],
)
def test_realert_at_most_once_a_minute_while_held(
    entry_mb: float, held_mb: float, event: AlertKind, message: str
) -> None:
    state, _ = policy.step(fresh(), 0.0, LIMITS, entry_mb)
    state, actions = policy.step(state, 59.9, LIMITS, held_mb)
    assert actions == []
    state, actions = policy.step(state, 60.0, LIMITS, held_mb)
    assert len(actions) == 1
    (alert,) = alerts(actions)
    assert alert.kind is event
    assert alert.message == message
    assert alert.message.endswith("(held)")
    assert alert.current_mb == held_mb
    assert state.last_alert_at == 60.0
    # The next minute counts from the re-alert, not from the entry.
    state, actions = feed(state, [(61.0, held_mb), (119.9, held_mb)])
    assert actions == []
    state, actions = policy.step(state, 120.0, LIMITS, held_mb)
    assert events(actions) == [event]
    # Re-alerts are not new warnings: the stats record lists entries only.
    assert len(state.warnings) == 1


def test_time_ticks_never_produce_level_alerts() -> None:
    state = at_critical(0.0)
    state, actions = feed(state, [(60.0, None), (600.0, None)])
    assert actions == []
    assert state.level is Level.CRITICAL
    assert state.current_mb == 2107.4


# -- hysteresis -----------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.1, 1e-9, 500.0])
def test_warning_drops_to_ok_below_90_percent_with_recovered_alert(epsilon: float) -> None:
    state = at_warning(0.0)
    mb = WARN_FLOOR - epsilon
    state, actions = policy.step(state, 10.0, LIMITS, mb)
    assert state.level is Level.OK
    assert state.last_alert_at is None
    (alert,) = actions
    assert isinstance(alert, Alert)
    assert alert.kind is AlertKind.RECOVERED
    assert alert.threshold_mb == pytest.approx(921.6)
    assert alert.current_mb == mb
    assert alert.message.startswith(f"RECOVERED: memory {mb:.1f} MB back below 921.6 MB")
    # Recovery is not a warning in the stats record.
    assert state.warnings == ("WARNING: memory 1030.2 MB exceeds 1024 MB",)


@pytest.mark.parametrize("mb", [WARN_FLOOR, 921.7, 1000.0, 1023.9])
def test_warning_holds_from_90_percent_up(mb: float) -> None:
    state = at_warning(0.0)
    state, actions = policy.step(state, 10.0, LIMITS, mb)
    assert actions == []
    assert state.level is Level.WARNING


@pytest.mark.parametrize("mb", [CRIT_FLOOR, 1900.0, 2047.9])
def test_critical_holds_from_90_percent_up(mb: float) -> None:
    state = at_critical(0.0)
    state, actions = policy.step(state, 10.0, LIMITS, mb)
    assert actions == []
    assert state.level is Level.CRITICAL


@pytest.mark.parametrize("mb", [CRIT_FLOOR - 0.1, 1500.0, 1023.0, WARN_FLOOR])
def test_critical_falls_to_warning_without_a_new_alert(mb: float) -> None:
    state = at_critical(0.0)
    state, actions = policy.step(state, 10.0, LIMITS, mb)
    assert actions == []
    assert state.level is Level.WARNING
    # The minute still counts from the CRITICAL alert; no new entry in the warnings.
    assert state.last_alert_at == 0.0
    assert state.warnings == ("CRITICAL: memory 2107.4 MB exceeds 2048 MB",)


def test_after_falling_to_warning_the_held_realert_comes_a_minute_after_the_last_alert() -> None:
    # Implementation choice: the drop from CRITICAL is not an entry; WARNING then re-alerts as
    # "held" once a minute has passed since the last (CRITICAL) alert.
    state = at_critical(0.0)
    state, actions = feed(state, [(10.0, 1500.0), (59.9, 1500.0)])
    assert actions == []
    state, actions = policy.step(state, 60.0, LIMITS, 1500.0)
    (alert,) = alerts(actions)
    assert alert.kind is AlertKind.MEMORY_WARNING
    assert alert.level is Level.WARNING
    assert alert.message == "WARNING: memory 1500.0 MB exceeds 1024 MB (held)"


def test_critical_dropping_when_a_minute_has_passed_realerts_at_the_new_level() -> None:
    state = at_critical(0.0)
    state, actions = policy.step(state, 75.0, LIMITS, 1500.0)
    assert state.level is Level.WARNING
    assert [(a.kind, a.message) for a in alerts(actions)] == [
        (AlertKind.MEMORY_WARNING, "WARNING: memory 1500.0 MB exceeds 1024 MB (held)")
    ]
    assert state.last_alert_at == 75.0


def test_critical_straight_to_ok_gives_one_recovered_alert() -> None:
    state = at_critical(0.0)
    state, actions = policy.step(state, 5.0, LIMITS, 100.0)
    assert events(actions) == [AlertKind.RECOVERED]
    assert state.level is Level.OK


def test_rising_again_after_falling_is_a_new_entry_even_within_the_minute() -> None:
    state = at_critical(0.0)
    state, _ = policy.step(state, 10.0, LIMITS, 1500.0)
    state, actions = policy.step(state, 20.0, LIMITS, 2100.0)
    assert events(actions) == [AlertKind.MEMORY_CRITICAL]
    assert state.level is Level.CRITICAL
    assert len(state.warnings) == 2


def test_warning_again_after_recovery_is_a_new_entry() -> None:
    state = at_warning(0.0)
    state, recovered = policy.step(state, 2.0, LIMITS, 500.0)
    assert events(recovered) == [AlertKind.RECOVERED]
    state, actions = policy.step(state, 4.0, LIMITS, 1100.0)
    assert events(actions) == [AlertKind.MEMORY_WARNING]
    assert state.warnings == (
        "WARNING: memory 1030.2 MB exceeds 1024 MB",
        "WARNING: memory 1100.0 MB exceeds 1024 MB",
    )


def test_the_hysteresis_band_does_not_raise_a_level_from_ok() -> None:
    state, actions = policy.step(fresh(), 0.0, LIMITS, 1000.0)
    assert actions == []
    assert state.level is Level.OK


@pytest.mark.parametrize(
    ("current", "mb", "expected"),
    [
        (Level.OK, 1023.9, Level.OK),
        (Level.OK, 1024.0, Level.WARNING),
        (Level.OK, 2048.0, Level.CRITICAL),
        (Level.WARNING, WARN_FLOOR, Level.WARNING),
        (Level.WARNING, WARN_FLOOR - 0.01, Level.OK),
        (Level.WARNING, 2048.0, Level.CRITICAL),
        (Level.CRITICAL, CRIT_FLOOR, Level.CRITICAL),
        (Level.CRITICAL, CRIT_FLOOR - 0.01, Level.WARNING),
        (Level.CRITICAL, WARN_FLOOR, Level.WARNING),
        (Level.CRITICAL, WARN_FLOOR - 0.01, Level.OK),
    ],
)
def test_level_for_table(current: Level, mb: float, expected: Level) -> None:
    assert policy.level_for(current, mb, LIMITS) is expected


# -- max_mb ---------------------------------------------------------------------------------


def test_max_mb_sends_sigterm_after_a_sigterm_sent_alert() -> None:
    state = at_critical(0.0)
    state, actions = policy.step(state, 10.0, LIMITS, 4113.9)
    assert actions == [
        Alert(
            AlertKind.SIGTERM_SENT,
            4113.9,
            4096.0,
            "SIGTERM: memory 4113.9 MB exceeds hard limit 4096 MB",
        ),
        TERM,
    ]
    assert state.ending is EndReason.MEMORY_LIMIT
    assert state.term_sent_at == 10.0
    assert state.grace_s == 5.0
    assert state.kill_sent is False


def test_max_mb_from_ok_alerts_critical_then_sigterm_sent_then_signals() -> None:
    state, actions = policy.step(fresh(), 1.0, LIMITS, 4096.0)
    assert [type(a).__name__ for a in actions] == ["Alert", "Alert", "Signal"]
    assert events(actions) == [AlertKind.MEMORY_CRITICAL, AlertKind.SIGTERM_SENT]
    assert actions[-1] == TERM
    assert state.level is Level.CRITICAL


def test_sigkill_follows_after_term_grace_exactly_once() -> None:
    state = at_critical(0.0)
    state, _ = policy.step(state, 10.0, LIMITS, 4200.0)
    state, actions = policy.step(state, 14.9, LIMITS, None)
    assert actions == []
    state, actions = policy.step(state, 15.0, LIMITS, None)
    assert len(actions) == 2
    kill_alert, kill = actions
    assert kill == KILL
    assert isinstance(kill_alert, Alert)
    assert kill_alert.kind is AlertKind.SIGKILL_SENT
    assert kill_alert.level is Level.CRITICAL
    assert kill_alert.current_mb == 4200.0
    assert kill_alert.message == "SIGKILL: tree still alive 5.0 s after SIGTERM"
    assert state.kill_sent is True
    state, actions = feed(state, [(16.0, None), (20.0, 5000.0), (100.0, 5000.0), (200.0, None)])
    assert actions == []
    assert state.ending is EndReason.MEMORY_LIMIT


def test_a_late_sample_also_triggers_the_overdue_sigkill() -> None:
    state, _ = policy.step(fresh(), 0.0, LIMITS, 5000.0)
    state, actions = policy.step(state, 7.5, LIMITS, 4500.0)
    assert events(actions) == [AlertKind.SIGKILL_SENT]
    assert signals(actions) == [KILL]


def test_zero_grace_sends_sigkill_at_once() -> None:
    limits = Limits(term_grace_s=0.0)
    state, actions = policy.step(fresh(), 0.0, limits, 4500.0)
    assert events(actions) == [AlertKind.MEMORY_CRITICAL, AlertKind.SIGKILL_SENT]
    assert signals(actions) == [KILL]
    assert state.kill_sent is True
    state, actions = policy.step(state, 10.0, limits, 4500.0)
    assert actions == []


def test_no_second_sigterm_or_level_alert_while_ending() -> None:
    limits = Limits(term_grace_s=100.0)
    state, _ = policy.step(fresh(), 0.0, limits, 4500.0)
    state, actions = feed(state, [(1.0, 4600.0), (2.0, 9000.0), (3.0, 4100.0)], limits)
    assert actions == []
    # Over a minute later, still in the grace: the held re-alert does not fire either.
    state, actions = policy.step(state, 3.0 + 60.0, limits, 4600.0)
    assert actions == []
    state, actions = policy.step(state, 100.0, limits, 4600.0)
    assert events(actions) == [AlertKind.SIGKILL_SENT]
    assert signals(actions) == [KILL]
    assert state.peak_mb == 9000.0
    assert state.current_mb == 4600.0


def test_dropping_under_max_before_grace_still_kills() -> None:
    # SIGTERM was sent: whatever of the tree is left after the grace gets SIGKILL.
    state, _ = policy.step(fresh(), 0.0, LIMITS, 4500.0)
    state, actions = policy.step(state, 5.0, LIMITS, 100.0)
    assert signals(actions) == [KILL]
    assert AlertKind.RECOVERED not in events(actions)
    assert state.level is Level.OK


def test_disabled_monitoring_tracks_memory_but_never_alerts_or_signals() -> None:
    limits = Limits(enabled=False)
    state, actions = feed(
        fresh(),
        [(0.0, 1030.2), (1.0, 2107.4), (2.0, 10_000.0), (70.0, 10_000.0), (200.0, None)],
        limits,
    )
    assert actions == []
    assert state.level is Level.CRITICAL
    assert state.peak_mb == 10_000.0
    assert state.current_mb == 10_000.0
    assert state.ending is None
    assert state.warnings == ()
    state, actions = policy.step(state, 201.0, limits, 100.0)
    assert actions == []
    assert state.level is Level.OK
    assert state.current_mb == 100.0


# -- timeout_s ------------------------------------------------------------------------------


@pytest.mark.parametrize("started_at", [0.0, 1000.0])
def test_timeout_escalates_with_reason_timeout(started_at: float) -> None:
    limits = Limits(timeout_s=300.0)
    state, _ = policy.step(fresh(started_at), started_at + 1.0, limits, 500.0)
    state, actions = feed(state, [(started_at + 100.0, None), (started_at + 299.9, 600.0)], limits)
    assert actions == []
    assert state.ending is None
    state, actions = policy.step(state, started_at + 300.0, limits, None)
    assert actions == [
        Alert(
            AlertKind.TIMEOUT,
            600.0,
            4096.0,
            "TIMEOUT: running 300.0 s exceeds timeout_s 300 s",
        ),
        Signal(signal.SIGTERM, EndReason.TIMEOUT),
    ]
    assert state.ending is EndReason.TIMEOUT
    assert state.term_sent_at == started_at + 300.0
    state, actions = policy.step(state, started_at + 304.9, limits, None)
    assert actions == []
    state, actions = policy.step(state, started_at + 305.0, limits, None)
    assert events(actions) == [AlertKind.SIGKILL_SENT]
    assert signals(actions) == [Signal(signal.SIGKILL, EndReason.TIMEOUT)]
    state, actions = policy.step(state, started_at + 400.0, limits, None)
    assert actions == []


def test_timeout_also_fires_on_a_sample() -> None:
    limits = Limits(timeout_s=10.0)
    state, actions = policy.step(fresh(), 12.0, limits, 50.0)
    assert events(actions) == [AlertKind.TIMEOUT]
    assert signals(actions) == [Signal(signal.SIGTERM, EndReason.TIMEOUT)]
    assert state.ending is EndReason.TIMEOUT
    assert state.current_mb == 50.0


def test_memory_limit_and_timeout_in_one_step_ends_for_memory() -> None:
    limits = Limits(timeout_s=10.0)
    state, actions = policy.step(fresh(), 10.0, limits, 5000.0)
    assert AlertKind.TIMEOUT not in events(actions)
    assert signals(actions) == [TERM]
    assert state.ending is EndReason.MEMORY_LIMIT


def test_timeout_still_applies_when_monitoring_is_disabled_by_design() -> None:
    limits = Limits(enabled=False, timeout_s=60.0, term_grace_s=2.0)
    state, actions = policy.step(fresh(), 30.0, limits, 9000.0)
    assert actions == []
    state, actions = policy.step(state, 60.0, limits, None)
    assert events(actions) == [AlertKind.TIMEOUT]
    assert signals(actions) == [Signal(signal.SIGTERM, EndReason.TIMEOUT)]
    state, actions = policy.step(state, 62.0, limits, None)
    assert events(actions) == [AlertKind.SIGKILL_SENT]
    assert signals(actions) == [Signal(signal.SIGKILL, EndReason.TIMEOUT)]


def test_no_timeout_means_time_alone_never_acts() -> None:
    state, actions = feed(fresh(), [(1e6, None), (1e9, 10.0)])
    assert actions == []
    assert state.ending is None


# -- request_end (stop, kill, shutdown) -------------------------------------------------------


@pytest.mark.parametrize("reason", [EndReason.STOPPED, EndReason.DAEMON_SHUTDOWN])
def test_stop_sends_sigterm_then_sigkill_after_grace_without_alerts(reason: EndReason) -> None:
    state = at_warning(0.0)
    state, actions = policy.request_end(state, 10.0, reason, 3.0)
    assert actions == [Signal(signal.SIGTERM, reason)]
    assert state.ending is reason
    assert state.term_sent_at == 10.0
    assert state.grace_s == 3.0
    state, actions = policy.step(state, 12.9, LIMITS, None)
    assert actions == []
    state, actions = policy.step(state, 13.0, LIMITS, None)
    # A stop is not a memory event: SIGKILL, but no sigkill_sent alert.
    assert actions == [Signal(signal.SIGKILL, reason)]
    assert state.kill_sent is True


def test_memory_samples_during_a_stop_are_tracked_but_silent() -> None:
    state, _ = policy.request_end(fresh(), 0.0, EndReason.STOPPED, 10.0)
    state, actions = feed(state, [(1.0, 1500.0), (2.0, 3000.0), (3.0, 5000.0)])
    assert actions == []
    assert state.level is Level.CRITICAL
    assert state.peak_mb == 5000.0
    assert state.ending is EndReason.STOPPED


def test_kill_with_zero_grace_sends_only_sigkill() -> None:
    state, actions = policy.request_end(fresh(), 5.0, EndReason.STOPPED, 0.0)
    assert actions == [Signal(signal.SIGKILL, EndReason.STOPPED)]
    assert state.kill_sent is True


def test_kill_during_a_stop_shortens_the_grace() -> None:
    state, _ = policy.request_end(fresh(), 0.0, EndReason.STOPPED, 30.0)
    state, actions = policy.request_end(state, 2.0, EndReason.STOPPED, 0.0)
    assert actions == [Signal(signal.SIGKILL, EndReason.STOPPED)]
    assert state.grace_s == 0.0
    assert state.kill_sent is True
    state, actions = policy.request_end(state, 3.0, EndReason.STOPPED, 0.0)
    assert actions == []


def test_a_shorter_grace_that_has_not_yet_run_out_moves_the_deadline() -> None:
    state, _ = policy.request_end(fresh(), 0.0, EndReason.STOPPED, 30.0)
    state, actions = policy.request_end(state, 2.0, EndReason.STOPPED, 5.0)
    assert actions == []
    assert policy.next_deadline(state, LIMITS) == 5.0
    state, actions = policy.step(state, 5.0, LIMITS, None)
    assert actions == [Signal(signal.SIGKILL, EndReason.STOPPED)]


def test_request_end_twice_does_not_resend_sigterm() -> None:
    state, first = policy.request_end(fresh(), 0.0, EndReason.STOPPED, 5.0)
    assert first == [Signal(signal.SIGTERM, EndReason.STOPPED)]
    state, actions = policy.request_end(state, 1.0, EndReason.STOPPED, 5.0)
    assert actions == []
    # A longer grace does not extend the one already running either.
    state, actions = policy.request_end(state, 2.0, EndReason.DAEMON_SHUTDOWN, 60.0)
    assert actions == []
    assert state.grace_s == 5.0
    assert state.ending is EndReason.STOPPED
    assert state.term_sent_at == 0.0


def test_stop_during_a_memory_limit_keeps_the_reason() -> None:
    state, _ = policy.step(fresh(), 0.0, LIMITS, 5000.0)
    state, actions = policy.request_end(state, 1.0, EndReason.STOPPED, 0.0)
    # The kill happens now; the ending is still the memory limit, so it is alerted.
    assert events(actions) == [AlertKind.SIGKILL_SENT]
    assert signals(actions) == [KILL]
    assert state.ending is EndReason.MEMORY_LIMIT


# -- root_exited ----------------------------------------------------------------------------


def test_root_exit_stops_leftovers_with_reason_exited() -> None:
    state = at_warning(0.0)
    state, actions = policy.root_exited(state, 20.0, 5.0)
    assert actions == [Signal(signal.SIGTERM, EndReason.EXITED)]
    assert state.exited is True
    assert state.ending is EndReason.EXITED
    state, actions = policy.step(state, 24.9, LIMITS, None)
    assert actions == []
    state, actions = policy.step(state, 25.0, LIMITS, None)
    assert actions == [Signal(signal.SIGKILL, EndReason.EXITED)]


def test_root_exit_with_zero_grace_kills_leftovers_at_once() -> None:
    state, actions = policy.root_exited(fresh(), 1.0, 0.0)
    assert actions == [Signal(signal.SIGKILL, EndReason.EXITED)]
    assert state.kill_sent is True
    assert state.exited is True


def test_root_exit_while_ending_for_memory_keeps_memory_limit() -> None:
    state, _ = policy.step(fresh(), 0.0, LIMITS, 5000.0)
    state, actions = policy.root_exited(state, 1.0, 5.0)
    assert actions == []
    assert state.exited is True
    assert state.ending is EndReason.MEMORY_LIMIT
    assert state.term_sent_at == 0.0
    state, actions = policy.step(state, 5.0, LIMITS, None)
    assert events(actions) == [AlertKind.SIGKILL_SENT]
    assert signals(actions) == [KILL]


# -- next_deadline --------------------------------------------------------------------------


def test_next_deadline_in_each_phase() -> None:
    limits = Limits(timeout_s=100.0, term_grace_s=5.0)
    state = fresh(started_at=10.0)
    assert policy.next_deadline(state, LIMITS) is None
    assert policy.next_deadline(state, limits) == 110.0
    state, _ = policy.step(state, 20.0, limits, 1500.0)
    assert policy.next_deadline(state, limits) == 110.0
    state, _ = policy.step(state, 110.0, limits, None)
    assert state.ending is EndReason.TIMEOUT
    assert policy.next_deadline(state, limits) == 115.0
    state, _ = policy.step(state, 115.0, limits, None)
    assert state.kill_sent is True
    assert policy.next_deadline(state, limits) is None


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: policy.request_end(fresh(), 3.0, EndReason.STOPPED, 7.0)[0], 10.0),
        (lambda: policy.root_exited(fresh(), 4.0, 2.5)[0], 6.5),
        (lambda: policy.step(fresh(), 1.0, LIMITS, 5000.0)[0], 6.0),
        (lambda: policy.request_end(fresh(), 3.0, EndReason.STOPPED, 0.0)[0], None),
    ],
    ids=["stopping", "exited", "memory-limit", "killed"],
)
def test_next_deadline_while_ending(make: Callable[[], AgentState], expected: float | None) -> None:
    # While ending, the timeout no longer matters: only the grace expiry does.
    assert policy.next_deadline(make(), Limits(timeout_s=1.0)) == expected


# -- peak and warnings ----------------------------------------------------------------------


def test_peak_is_the_maximum_and_warnings_collect_entries() -> None:
    samples: list[tuple[float, float | None]] = [
        (0.0, 41.0),
        (2.0, 1030.2),
        (4.0, 800.0),
        (6.0, 2107.4),
        (8.0, None),
        (10.0, 1900.0),
    ]
    state, _ = feed(fresh(), samples)
    assert state.peak_mb == 2107.4
    assert state.current_mb == 1900.0
    # 800 MB is under 90% of warning_mb: recovered, so 2107.4 enters CRITICAL from OK.
    assert state.warnings == (
        "WARNING: memory 1030.2 MB exceeds 1024 MB",
        "CRITICAL: memory 2107.4 MB exceeds 2048 MB",
    )


# -- properties -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One thing that happens to an agent: a sample, a tick, a stop or the root's exit."""

    dt: float
    kind: str
    mb: float = 0.0
    grace_s: float = 0.0


ops = st.one_of(
    st.builds(
        Op,
        dt=st.floats(0, 90),
        kind=st.just("sample"),
        mb=st.one_of(
            st.floats(0, 6000),
            st.sampled_from([0.0, WARN_FLOOR, 1024.0, CRIT_FLOOR, 2048.0, 4096.0]),
        ),
    ),
    st.builds(Op, dt=st.floats(0, 90), kind=st.just("tick")),
    st.builds(
        Op, dt=st.floats(0, 10), kind=st.just("stop"), grace_s=st.sampled_from([0.0, 1.0, 30.0])
    ),
    st.builds(Op, dt=st.floats(0, 10), kind=st.just("exit"), grace_s=st.sampled_from([0.0, 5.0])),
)
limits_strategy = st.builds(
    Limits,
    term_grace_s=st.sampled_from([0.0, 0.5, 5.0]),
    timeout_s=st.sampled_from([None, 30.0, 300.0]),
    enabled=st.booleans(),
)
MEMORY_OPS = ("sample", "tick")


@dataclass
class Trace:
    """Everything a run did, step by step."""

    steps: list[tuple[float, AgentState, AgentState, list[Action]]]

    @property
    def actions(self) -> list[Action]:
        return [a for _, _, _, actions in self.steps for a in actions]


def run(limits: Limits, sequence: Sequence[Op], memory_only: bool = False) -> Trace:
    state = fresh()
    now = 0.0
    steps: list[tuple[float, AgentState, AgentState, list[Action]]] = []
    for op in sequence:
        if memory_only and op.kind not in MEMORY_OPS:
            continue
        now += op.dt
        before = state
        if op.kind == "sample":
            state, actions = policy.step(state, now, limits, op.mb)
        elif op.kind == "tick":
            state, actions = policy.step(state, now, limits, None)
        elif op.kind == "stop":
            state, actions = policy.request_end(state, now, EndReason.STOPPED, op.grace_s)
        else:
            state, actions = policy.root_exited(state, now, op.grace_s)
        steps.append((now, before, state, actions))
    return Trace(steps)


@settings(max_examples=300, deadline=None)
@given(limits=limits_strategy, sequence=st.lists(ops, max_size=40))
def test_property_signals_are_sent_once_and_in_order(limits: Limits, sequence: list[Op]) -> None:
    trace = run(limits, sequence)
    sent = [s.signal for s in signals(trace.actions)]
    assert sent.count(signal.SIGTERM) <= 1
    assert sent.count(signal.SIGKILL) <= 1
    if signal.SIGKILL in sent and signal.SIGTERM in sent:
        assert sent.index(signal.SIGTERM) < sent.index(signal.SIGKILL)
    if signal.SIGKILL in sent and signal.SIGTERM not in sent:
        # Straight to SIGKILL only when there was no grace: kill, or term_grace_s = 0.
        assert trace.steps[-1][2].grace_s == 0.0
    # Every signal carries the reason the agent is ending for.
    for _, _, after, actions in trace.steps:
        for s in signals(actions):
            assert s.reason is after.ending


@settings(max_examples=300, deadline=None)
@given(limits=limits_strategy, sequence=st.lists(ops, max_size=40))
def test_property_ending_never_changes_once_set(limits: Limits, sequence: list[Op]) -> None:
    trace = run(limits, sequence)
    ending: EndReason | None = None
    term_sent_at: float | None = None
    for _, before, after, _ in trace.steps:
        if before.ending is not None:
            assert after.ending is before.ending
            assert after.term_sent_at == before.term_sent_at
        if after.ending is not None and ending is None:
            ending, term_sent_at = after.ending, after.term_sent_at
        assert after.ending is ending
        assert after.term_sent_at == term_sent_at
        if before.kill_sent:
            assert after.kill_sent


@settings(max_examples=300, deadline=None)
@given(limits=limits_strategy, sequence=st.lists(ops, max_size=40))
def test_property_no_level_alert_after_ending(limits: Limits, sequence: list[Op]) -> None:
    actions = run(limits, sequence).actions
    level_events = LEVEL_EVENTS | {AlertKind.RECOVERED}
    terms = [i for i, a in enumerate(actions) if isinstance(a, Signal)]
    if terms:
        assert not any(isinstance(a, Alert) and a.kind in level_events for a in actions[terms[0] :])


@settings(max_examples=300, deadline=None)
@given(limits=limits_strategy, sequence=st.lists(ops, max_size=40))
def test_property_same_level_alerts_are_a_minute_apart(limits: Limits, sequence: list[Op]) -> None:
    last: dict[AlertKind, float] = {}
    for now, before, after, actions in run(limits, sequence).steps:
        if after.level is not before.level:
            last.clear()  # A level change allows the new level's entry alert at once.
        level_alerts = [a for a in alerts(actions) if a.kind in LEVEL_EVENTS]
        assert len(level_alerts) <= 1
        for alert in level_alerts:
            if alert.kind in last:
                assert now - last[alert.kind] >= policy.REALERT_INTERVAL_S
            last[alert.kind] = now
            assert alert.level is after.level


@settings(max_examples=300, deadline=None)
@given(sequence=st.lists(ops, max_size=40), timeout=st.sampled_from([None, 30.0]))
def test_property_disabled_monitoring_acts_only_on_timeout(
    sequence: list[Op], timeout: float | None
) -> None:
    limits = Limits(enabled=False, timeout_s=timeout)
    trace = run(limits, sequence, memory_only=True)
    for a in trace.actions:
        if isinstance(a, Alert):
            assert a.kind in (AlertKind.TIMEOUT, AlertKind.SIGKILL_SENT)
        else:
            assert a.reason is EndReason.TIMEOUT
    if timeout is None:
        assert trace.actions == []


@settings(max_examples=300, deadline=None)
@given(limits=limits_strategy, sequence=st.lists(ops, max_size=40))
def test_property_levels_peak_and_current_follow_the_samples(
    limits: Limits, sequence: list[Op]
) -> None:
    samples: list[float] = []
    for op, (_, _, after, _) in zip(sequence, run(limits, sequence).steps, strict=True):
        if op.kind == "sample":
            samples.append(op.mb)
        mb = after.current_mb
        assert mb == (samples[-1] if samples else 0.0)
        assert after.peak_mb == max([0.0, *samples])
        # A level is at least what the sample reaches, and held only down to 90%.
        if mb >= limits.critical_mb:
            assert after.level is Level.CRITICAL
        elif mb >= limits.warning_mb:
            assert after.level >= Level.WARNING
        if after.level is Level.CRITICAL:
            assert mb >= policy.HYSTERESIS * limits.critical_mb
        if after.level >= Level.WARNING:
            assert mb >= policy.HYSTERESIS * limits.warning_mb


def test_kernel_oom_kills_at_once_with_reason_oom_killed() -> None:
    state, actions = policy.kernel_oom(fresh(), 3.0, 4500.0, 4505.6)
    assert events(actions) == [AlertKind.OOM_KILL]
    assert signals(actions) == [Signal(signal.SIGKILL, EndReason.OOM_KILLED)]
    assert state.ending is EndReason.OOM_KILLED
    assert state.kill_sent is True
    assert state.ending.aborted


def test_kernel_oom_during_a_memory_limit_grace_skips_the_rest_of_it() -> None:
    state, _ = policy.step(fresh(), 0.0, LIMITS, 4200.0)
    assert state.ending is EndReason.MEMORY_LIMIT
    state, actions = policy.kernel_oom(state, 0.5, 4505.0, 4505.6)
    assert signals(actions) == [KILL]
    assert state.ending is EndReason.MEMORY_LIMIT
    state, again = policy.kernel_oom(state, 0.6, 4505.0, 4505.6)
    assert signals(again) == []  # SIGKILL went out already


def test_resume_end_keeps_the_grace_that_began_before_the_restart() -> None:
    state = AgentState(started_at=0.0)
    # SIGTERM went out 3 s before the new daemon's "now" of 100.0; grace 5: 2 s remain.
    state, actions = policy.resume_end(
        state, 100.0, EndReason.MEMORY_LIMIT, 5.0, term_sent_s_ago=3.0
    )
    assert actions == []
    assert (state.ending, state.term_sent_at, state.grace_s) == (EndReason.MEMORY_LIMIT, 97.0, 5.0)
    assert policy.next_deadline(state, LIMITS) == 102.0
    state, actions = policy.step(state, 101.9, LIMITS)
    assert [a for a in actions if isinstance(a, Signal)] == []
    state, actions = policy.step(state, 102.0, LIMITS)
    assert Signal(signal.SIGKILL, EndReason.MEMORY_LIMIT) in actions
    assert state.kill_sent


def test_resume_end_after_the_grace_ran_out_or_with_none_kills_at_once() -> None:
    for ago, grace, kill_sent in ((60.0, 5.0, False), (0.1, 0.0, False), (1.0, 5.0, True)):
        state, actions = policy.resume_end(
            AgentState(started_at=0.0),
            50.0,
            EndReason.STOPPED,
            grace,
            term_sent_s_ago=ago,
            kill_sent=kill_sent,
        )
        assert Signal(signal.SIGKILL, EndReason.STOPPED) in actions, (ago, grace, kill_sent)
        assert state.kill_sent


def test_resume_end_without_a_recorded_sigterm_starts_the_escalation_over() -> None:
    state, actions = policy.resume_end(
        AgentState(started_at=0.0), 10.0, EndReason.TIMEOUT, 2.0, term_sent_s_ago=None
    )
    assert actions == [Signal(signal.SIGTERM, EndReason.TIMEOUT)]
    assert state.term_sent_at == 10.0


def test_an_agent_being_ended_is_going_until_its_sigkill_is_long_past() -> None:
    assert not policy.going(AgentState(started_at=0.0), 5.0)  # not being ended at all
    # SIGTERM at 10 with 3 s of grace: going throughout, whatever the time.
    terminated, _ = policy.request_end(AgentState(started_at=0.0), 10.0, EndReason.STOPPED, 3.0)
    assert policy.going(terminated, 10.0)
    assert policy.going(terminated, 100.0)
    # The grace ran out at 13: SIGKILL; the tree should be gone 2 s later at the latest.
    killed, actions = policy.step(terminated, 13.0, Limits())
    assert Signal(signal.SIGKILL, EndReason.STOPPED) in actions
    assert policy.going(killed, 13.0)
    assert policy.going(killed, 14.99)
    assert not policy.going(killed, 15.0)
    # Killed at once (grace 0, as at the common ceiling): the same 2 s from the kill.
    at_once, _ = policy.request_end(AgentState(started_at=0.0), 20.0, EndReason.HOST_PRESSURE, 0)
    assert at_once.kill_sent
    assert policy.going(at_once, 21.9)
    assert not policy.going(at_once, 22.0, stuck_after_s=2.0)
