"""The limits one agent is held to: thresholds, grace, timeout, what is measured."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from supervisord.core.errors import ConfigError
from supervisord.core.validate import positive

# "auto": the working set of the agent's memory cgroup where it has one, else "rss".
Metric = Literal["auto", "rss", "pss"]
METRICS: tuple[Metric, ...] = ("auto", "rss", "pss")
# What a sample measured: "auto" resolves to one of the others, agent by agent.
Measured = Literal["working_set", "rss", "pss"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits one agent is held to; per type and per launch they override the defaults."""

    warning_mb: float = 1024.0
    critical_mb: float = 2048.0
    max_mb: float = 4096.0
    term_grace_s: float = 5.0
    timeout_s: float | None = None
    enabled: bool = True
    metric: Metric = "auto"
    # Warn when, at the current growth rate, max_mb is this few seconds away (None: never).
    predict_s: float | None = None

    def validated(self, where: str = "memory") -> Limits:
        for key in ("warning_mb", "critical_mb", "max_mb"):
            positive(f"{where}.{key}", getattr(self, key))
        positive(f"{where}.term_grace_s", self.term_grace_s, allow_zero=True)
        for key in ("timeout_s", "predict_s"):
            value = getattr(self, key)
            if value is not None:
                positive(f"{where}.{key}", value)
        if not self.warning_mb < self.critical_mb < self.max_mb:
            raise ConfigError(
                f"{where}: thresholds must rise: warning_mb ({self.warning_mb:g}) < "
                f"critical_mb ({self.critical_mb:g}) < max_mb ({self.max_mb:g})"
            )
        if self.metric not in METRICS:
            raise ConfigError(
                f"{where}.metric = {self.metric!r} is not allowed; use 'auto', 'rss' or 'pss'"
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


LIMIT_KEYS = frozenset(f.name for f in fields(Limits))
