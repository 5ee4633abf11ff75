"""What past runs say an agent type needs: the p90 peak of its recent successful runs.

The guide's threshold analysis (``report thresholds``) put to work: a launch that does not
say what it needs is expected to need what nine in ten runs of its type needed before.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Sequence

# The runs of a type that count: recent ones, so the figure follows the agent as it changes.
RUNS_KEPT = 100
REQUEST_PERCENTILE = 90.0


def percentile(values: Sequence[float], q: float) -> float:
    """numpy.percentile(values, q) with numpy's default ("linear") method, bit for bit."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    ordered = sorted(values)
    virtual = (len(ordered) - 1) * (q / 100)
    lo = math.floor(virtual)
    a, b = ordered[lo], ordered[min(lo + 1, len(ordered) - 1)]
    t = virtual - lo
    # numpy's _lerp interpolates from the nearer end, which differs in the last bit.
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


class PeakHistory:
    """Peaks of finished runs per agent type (aborted runs say nothing of what is needed)."""

    def __init__(self, runs_kept: int = RUNS_KEPT) -> None:
        self._peaks: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=runs_kept))

    def add(self, agent_type: str, peak_mb: float, *, aborted: bool) -> None:
        if not aborted and peak_mb > 0:
            self._peaks[agent_type].append(peak_mb)

    def runs(self, agent_type: str) -> int:
        return len(self._peaks.get(agent_type, ()))

    def request_mb(self, agent_type: str) -> float | None:
        """The p90 peak of the type's kept runs, rounded up to a whole MB; None: no runs."""
        peaks = self._peaks.get(agent_type)
        if not peaks:
            return None
        return float(math.ceil(percentile(list(peaks), REQUEST_PERCENTILE)))
