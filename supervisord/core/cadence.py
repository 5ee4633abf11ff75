"""When to look at an agent next: growth rate, time to a threshold, adaptive delay.

Pure functions of explicit times, like the policy. An idle agent is sampled at the
configured interval; one whose headroom divided by its growth rate is short is sampled
sooner, down to a floor, so a tree growing 1 GB/s is caught close to its limit while idle
agents cost nothing extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from supervisord.core.limits import Limits

# Smoothing of the reported growth rate; the schedule also heeds the latest slope, so a
# sudden leak is acted on at its second sample, not after the average catches up.
RATE_TAU_S = 1.0
# Sample again before half the projected time to the next threshold has passed.
HEADROOM_FRACTION = 0.5
# A young agent's appetite is unknown: look at it at intervals of half its age.
YOUTH_FRACTION = 0.5


@dataclass(frozen=True, slots=True)
class Growth:
    at: float
    mb: float
    rate_mb_s: float = 0.0  # smoothed, for reports and predictions
    slope_mb_s: float = 0.0  # between the last two samples, for the schedule

    @property
    def urgent_rate_mb_s(self) -> float:
        return max(self.rate_mb_s, self.slope_mb_s)


def observe(previous: Growth | None, at: float, mb: float) -> Growth:
    if previous is None or at <= previous.at:
        return Growth(at=at, mb=mb, rate_mb_s=0.0 if previous is None else previous.rate_mb_s)
    dt = at - previous.at
    slope = (mb - previous.mb) / dt
    alpha = 1.0 - math.exp(-dt / RATE_TAU_S)
    rate = previous.rate_mb_s + alpha * (slope - previous.rate_mb_s)
    return Growth(at=at, mb=mb, rate_mb_s=rate, slope_mb_s=slope)


def time_to(growth: Growth | None, target_mb: float, *, urgent: bool = False) -> float | None:
    """Seconds until ``target_mb`` at the current rate; None when not growing toward it."""
    if growth is None:
        return None
    if growth.mb >= target_mb:
        return 0.0
    rate = growth.urgent_rate_mb_s if urgent else growth.rate_mb_s
    if rate <= 0:
        return None
    return (target_mb - growth.mb) / rate


def next_threshold(mb: float, limits: Limits) -> float:
    """The nearest threshold above ``mb`` (the hard limit once past critical)."""
    for threshold in (limits.warning_mb, limits.critical_mb):
        if mb < threshold:
            return threshold
    return limits.max_mb


def next_delay(
    growth: Growth | None, limits: Limits, age_s: float, floor_s: float, interval_s: float
) -> float:
    """Seconds until this agent should be sampled again."""
    delay = interval_s
    if age_s < 2 * interval_s:
        delay = min(delay, max(floor_s, YOUTH_FRACTION * age_s))
    if growth is not None:
        eta = time_to(growth, next_threshold(growth.mb, limits), urgent=True)
        if eta is not None:
            delay = min(delay, HEADROOM_FRACTION * eta)
    return min(interval_s, max(floor_s, delay))


def crossing_time(previous: Growth | None, at: float, mb: float, threshold: float) -> float:
    """When ``threshold`` was most likely crossed, between the last sample and this one."""
    if previous is None or previous.mb >= threshold or mb <= previous.mb:
        return at
    fraction = (threshold - previous.mb) / (mb - previous.mb)
    return previous.at + fraction * (at - previous.at)
