"""Frozen value types shared by the pure core and the edges."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass


class Level(enum.IntEnum):
    """How close an agent is to its limit; ordered so levels compare."""

    OK = 0
    WARNING = 1
    CRITICAL = 2


class EndReason(enum.StrEnum):
    """Why an agent's tree is gone (the stats record's ``reason``)."""

    EXITED = "exited"
    MEMORY_LIMIT = "memory_limit"
    TIMEOUT = "timeout"
    STOPPED = "stopped"
    DAEMON_SHUTDOWN = "daemon_shutdown"
    LOST = "lost"
    OOM_KILLED = "oom_killed"

    @property
    def aborted(self) -> bool:
        """True when the daemon ended the agent for memory or time."""
        return self in (EndReason.MEMORY_LIMIT, EndReason.TIMEOUT, EndReason.OOM_KILLED)


class AlertEvent(enum.StrEnum):
    """The ``event`` field of a memory-alerts.log record."""

    MEMORY_WARNING = "memory_warning"
    MEMORY_CRITICAL = "memory_critical"
    SIGTERM_SENT = "sigterm_sent"
    SIGKILL_SENT = "sigkill_sent"
    TIMEOUT = "timeout"
    LAUNCH_REFUSED = "launch_refused"
    RECOVERED = "recovered"
    LIMIT_PREDICTED = "limit_predicted"
    OOM_KILL = "oom_kill"


@dataclass(frozen=True, slots=True)
class Alert:
    """An action: write this record to the alerts log and tell subscribers."""

    event: AlertEvent
    level: Level
    current_mb: float
    threshold_mb: float
    message: str


@dataclass(frozen=True, slots=True)
class Signal:
    """An action: send ``signal`` to every live process of the agent's tree."""

    signal: signal.Signals
    reason: EndReason


Action = Alert | Signal
