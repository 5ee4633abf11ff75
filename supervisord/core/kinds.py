"""Every enumerated string of the records and the event stream: one enum each."""

from __future__ import annotations

import enum


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
    # Shed to keep the host within its memory budget (lowest priority first).
    HOST_PRESSURE = "host_pressure"
    # Ended by `claude-pm restart`: the next run starts at once.
    RESTART = "restart"

    @property
    def aborted(self) -> bool:
        """True when the daemon ended the agent for memory, time or host pressure."""
        return self in _ABORTS


class EventType(enum.StrEnum):
    """The ``type`` of an event on the stream (``subscribe``, metrics, webhooks, top)."""

    LAUNCH = "launch"
    ALERT = "alert"
    EXIT = "exit"
    # The admission queue: a launch waits for room in the host's budget, gets it, or is
    # taken out of the queue.
    QUEUED = "queued"
    ADMITTED = "admitted"
    CANCELLED = "cancelled"
    # Restart policies: a run ended and the next is due after a delay; it started; the
    # agent failed for good (too many runs within restart_window_s).
    RESTARTING = "restarting"
    RESTARTED = "restarted"
    RESTART_LIMIT = "restart_limit"


class AlertKind(enum.StrEnum):
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
    HOST_PRESSURE = "host_pressure"
    # Its runs came back too often within restart_window_s: no more runs (state "failed").
    RESTART_LIMIT = "restart_limit"
    # A process of the tree moved itself out of the agent's memory cgroup.
    CGROUP_ESCAPE = "cgroup_escape"

    @property
    def level(self) -> Level:
        """The level every alert of this kind is written with."""
        return Level.CRITICAL if self in _CRITICAL_ALERTS else Level.WARNING


_CRITICAL_ALERTS = frozenset(
    {
        AlertKind.MEMORY_CRITICAL,
        AlertKind.SIGTERM_SENT,
        AlertKind.SIGKILL_SENT,
        AlertKind.TIMEOUT,
        AlertKind.OOM_KILL,
        AlertKind.HOST_PRESSURE,
        AlertKind.RESTART_LIMIT,
    }
)
_ABORTS = frozenset(
    {EndReason.MEMORY_LIMIT, EndReason.TIMEOUT, EndReason.OOM_KILLED, EndReason.HOST_PRESSURE}
)
