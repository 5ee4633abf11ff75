"""Adaptive sampling: growth estimates and the schedule, with explicit times."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisord.core import cadence
from supervisord.core.cadence import Growth
from supervisord.core.limits import Limits

LIMITS = Limits(warning_mb=1024, critical_mb=2048, max_mb=4096)
FLOOR, INTERVAL = 0.05, 2.0


def grow(points: list[tuple[float, float]]) -> Growth | None:
    growth = None
    for at, mb in points:
        growth = cadence.observe(growth, at, mb)
    return growth


def test_steady_growth_converges_to_its_rate() -> None:
    growth = grow([(t / 10, 100 + 50 * t / 10) for t in range(100)])  # 50 MB/s for 10 s
    assert growth is not None
    assert growth.slope_mb_s == pytest.approx(50)
    assert growth.rate_mb_s == pytest.approx(50, rel=0.01)


def test_a_sudden_leak_is_urgent_at_its_second_sample() -> None:
    growth = grow([(0.0, 100), (2.0, 100), (4.0, 100), (4.1, 200)])  # 1000 MB/s from 4 s
    assert growth is not None
    assert growth.slope_mb_s == pytest.approx(1000)
    assert growth.rate_mb_s < 200  # the smoothed rate lags ...
    assert growth.urgent_rate_mb_s == pytest.approx(1000)  # ... the schedule does not


@pytest.mark.parametrize(
    ("points", "target", "expected"),
    [
        ([(0, 100), (1, 100)], 4096, None),  # not growing
        ([(0, 200), (1, 100)], 4096, None),  # shrinking
        ([(0, 4000), (1, 4100)], 4096, 0.0),  # already past it
        ([(t, 100.0 * t) for t in range(40)], 4096, pytest.approx(1.96, rel=0.05)),
    ],
)
def test_time_to(points: list[tuple[float, float]], target: float, expected: object) -> None:
    assert cadence.time_to(grow(points), target) == expected


@pytest.mark.parametrize(
    ("mb", "expected"), [(0, 1024), (1023.9, 1024), (1024, 2048), (3000, 4096), (5000, 4096)]
)
def test_next_threshold(mb: float, expected: float) -> None:
    assert cadence.next_threshold(mb, LIMITS) == expected


def test_idle_old_agent_waits_the_whole_interval() -> None:
    growth = grow([(0, 50), (2, 50), (4, 50)])
    assert cadence.next_delay(growth, LIMITS, age_s=60, floor_s=FLOOR, interval_s=INTERVAL) == 2.0


def test_young_agent_is_looked_at_at_half_its_age() -> None:
    assert cadence.next_delay(None, LIMITS, age_s=0.0, floor_s=FLOOR, interval_s=INTERVAL) == FLOOR
    assert cadence.next_delay(None, LIMITS, age_s=1.0, floor_s=FLOOR, interval_s=INTERVAL) == 0.5
    assert cadence.next_delay(None, LIMITS, age_s=10, floor_s=FLOOR, interval_s=INTERVAL) == 2.0


def test_fast_growth_near_the_limit_hits_the_floor() -> None:
    growth = grow([(0.0, 3900), (0.1, 4000)])  # 1000 MB/s, 96 MB from max
    delay = cadence.next_delay(growth, LIMITS, age_s=60, floor_s=FLOOR, interval_s=INTERVAL)
    assert delay == FLOOR


def test_moderate_growth_gets_half_the_time_to_the_next_threshold() -> None:
    growth = grow([(0.0, 900), (1.0, 1000)])  # 100 MB/s, 24 MB below warning
    delay = cadence.next_delay(growth, LIMITS, age_s=60, floor_s=FLOOR, interval_s=INTERVAL)
    assert delay == pytest.approx(0.12)


def test_crossing_time_is_interpolated_between_samples() -> None:
    previous = Growth(at=10.0, mb=3896)
    assert cadence.crossing_time(previous, 10.4, 4296, 4096) == pytest.approx(10.2)
    assert cadence.crossing_time(None, 10.4, 4296, 4096) == 10.4
    assert cadence.crossing_time(Growth(at=10.0, mb=5000), 10.4, 5100, 4096) == 10.4


@given(
    st.lists(st.tuples(st.floats(0.001, 5), st.floats(0, 10_000)), min_size=1, max_size=30),
    st.floats(0, 1000),
)
def test_delay_is_always_within_floor_and_interval(
    steps: list[tuple[float, float]], age: float
) -> None:
    at, growth = 0.0, None
    for dt, mb in steps:
        at += dt
        growth = cadence.observe(growth, at, mb)
        delay = cadence.next_delay(growth, LIMITS, age_s=age, floor_s=FLOOR, interval_s=INTERVAL)
        assert FLOOR <= delay <= INTERVAL
