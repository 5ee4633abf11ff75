"""The restart policy (core/restart): which ends come back, the backoff, the limit.

Pure logic, with explicit timestamps: no process and no sleep here.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisord.core.errors import ConfigError
from supervisord.core.kinds import EndReason
from supervisord.core.restart import MODES, RestartPolicy, Runs, after_run, apply_restart

QUICK = RestartPolicy(
    restart="on-failure", restart_delay_s=0.2, restart_limit=4, restart_jitter=0.0
)


@pytest.mark.parametrize(
    ("mode", "reason", "exit_code", "signalled", "expected"),
    [
        ("no", EndReason.EXITED, 1, False, False),
        ("on-failure", EndReason.EXITED, 1, False, True),
        ("on-failure", EndReason.EXITED, 0, False, False),
        ("on-failure", EndReason.EXITED, None, False, True),  # a signal it did not send
        ("on-failure", EndReason.MEMORY_LIMIT, None, True, False),
        ("on-abort", EndReason.MEMORY_LIMIT, None, True, True),
        ("on-abort", EndReason.OOM_KILLED, None, True, True),
        ("on-abort", EndReason.HOST_PRESSURE, None, True, True),
        ("on-abort", EndReason.TIMEOUT, None, True, True),
        ("on-abort", EndReason.EXITED, 1, False, False),
        ("always", EndReason.EXITED, 0, False, True),
        ("always", EndReason.MEMORY_LIMIT, None, True, True),
        ("always", EndReason.STOPPED, None, True, False),  # stop and kill end the restarts
        ("always", EndReason.DAEMON_SHUTDOWN, None, True, False),
    ],
)
def test_which_ends_come_back(
    mode: str, reason: EndReason, exit_code: int | None, signalled: bool, expected: bool
) -> None:
    policy = apply_restart(RestartPolicy(), {"restart": mode}, "agents.x")
    assert policy.wants(reason, exit_code, signalled) is expected


def test_quick_failures_back_off_then_fail_at_the_limit() -> None:
    runs, t, delays = Runs(), 100.0, []
    while True:
        started, ended = t, t + 0.05  # each run fails at once
        step = after_run(QUICK, runs, started, ended, draw=0.5)
        if step.delay_s is None:
            break
        delays.append(step.delay_s)
        runs, t = step.runs, ended + step.delay_s
    assert delays == pytest.approx([0.2, 0.4, 0.8])
    assert runs.run == 4  # four runs, four records, then no more
    assert runs.restarts == 3
    assert step.failed is not None
    assert "4 runs started within 300 s" in step.failed


def test_a_healthy_run_resets_the_backoff_and_old_runs_leave_the_window() -> None:
    policy = replace_policy(restart_delay_s=1, restart_limit=3, restart_window_s=60)
    runs = Runs(run=3, streak=2, starts=(0.0, 10.0))
    # Lived 30 s, past restart_reset_s (20): the first delay again; the starts at 0 and 10
    # are more than 60 s before the next run's start (100 + 1), so the limit is not reached.
    step = after_run(replace_policy(policy, restart_reset_s=20), runs, 70.0, 100.0, draw=0.5)
    assert step.delay_s == pytest.approx(1.0)
    assert step.runs == Runs(run=4, streak=1, starts=(70.0,))


def test_the_delay_is_capped_and_jittered_within_its_fraction() -> None:
    policy = replace_policy(restart_delay_s=1, restart_delay_max_s=10, restart_jitter=0.2)
    assert policy.delay(10, 0.5) == pytest.approx(10.0)
    assert policy.delay(10, 0.0) == pytest.approx(8.0)
    assert policy.delay(10, 0.999999) == pytest.approx(12.0, rel=1e-5)


@given(
    streak=st.integers(min_value=0, max_value=200),
    draw=st.floats(min_value=0, max_value=1, exclude_max=True),
    jitter=st.floats(min_value=0, max_value=0.99),
)
def test_delays_stay_within_the_jittered_cap(streak: int, draw: float, jitter: float) -> None:
    policy = replace_policy(restart_delay_s=0.5, restart_delay_max_s=30, restart_jitter=jitter)
    assert 0 <= policy.delay(streak, draw) <= 30 * (1 + jitter) + 1e-9


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"restart": "sometimes"}, "agents.x.restart = 'sometimes'"),
        ({"restart_delay_s": -1}, "agents.x.restart_delay_s = -1"),
        ({"restart_delay_max_s": "soon"}, "agents.x.restart_delay_max_s = 'soon'"),
        ({"restart_backoff": 0.5}, "agents.x.restart_backoff = 0.5"),
        ({"restart_limit": 0}, "agents.x.restart_limit = 0"),
        ({"restart_window_s": 0}, "agents.x.restart_window_s = 0"),
        ({"restart_jitter": 1.5}, "agents.x.restart_jitter = 1.5"),
        ({"resume_command": "claude -r"}, "agents.x.resume_command = 'claude -r'"),
        ({"resume_command": []}, "agents.x.resume_command = []"),
        ({"session_pattern": "session: (\\S+"}, "does not compile"),
        ({"session_pattern": "session: \\S+"}, "has 0 groups"),
        ({"session_pattern": "(a)(b)"}, "has 2 groups"),
        ({"restart_delay_s": 10, "restart_delay_max_s": 5}, "restart_delay_max_s = 5 is below"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_restart(RestartPolicy(), values, "agents.x")
    assert names in str(caught.value)


def test_every_mode_and_key_reads_back() -> None:
    values = {
        "restart": "always",
        "restart_delay_s": 0.5,
        "restart_backoff": 1,
        "restart_delay_max_s": 5,
        "restart_limit": 2,
        "restart_window_s": 30,
        "restart_reset_s": 0,
        "restart_jitter": 0,
        "resume_command": ["claude", "--resume", "{session_uuid}"],
        "session_pattern": "session: (\\S+)",
    }
    policy = apply_restart(RestartPolicy(), values, "agents.x")
    assert policy.as_dict() == {**values, "restart_backoff": 1.0}
    assert set(MODES) == {"no", "on-failure", "on-abort", "always"}


def replace_policy(base: RestartPolicy | None = None, **values: Any) -> RestartPolicy:
    return apply_restart(base or RestartPolicy(), values, "agents.x")
