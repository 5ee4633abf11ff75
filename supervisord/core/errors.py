"""The project's exceptions: one base class, a few precise subclasses, every one here.

Each carries a stable ``code`` (an :class:`ErrorCode`) that the control protocol sends to
clients, so a client can react to the kind of failure without parsing the message.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """The ``error.code`` of a failed response, and what each error class carries."""

    ERROR = "error"
    BAD_REQUEST = "bad_request"
    UNKNOWN_COMMAND = "unknown_command"
    NOT_FOUND = "not_found"
    INVALID_CONFIG = "invalid_config"
    LAUNCH_FAILED = "launch_failed"
    LAUNCH_REFUSED = "launch_refused"
    PERMISSION_DENIED = "permission_denied"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    DAEMON_NOT_RUNNING = "daemon_not_running"
    ALREADY_RUNNING = "already_running"
    PROTOCOL_ERROR = "protocol_error"
    CGROUP_ERROR = "cgroup_error"
    CGROUP_UNAVAILABLE = "cgroup_unavailable"
    QUEUE_FULL = "queue_full"


class SupervisordError(Exception):
    """Base class of every error this package raises on purpose."""

    code: str = ErrorCode.ERROR


class ConfigError(SupervisordError):
    """A configuration value is invalid; the message names key, value and what is allowed."""

    code = ErrorCode.INVALID_CONFIG


class UsageError(SupervisordError):
    """A request or command line is malformed: wrong command, argument or type."""

    code = ErrorCode.BAD_REQUEST


class NotFoundError(SupervisordError):
    """No agent has the given subprocess_id."""

    code = ErrorCode.NOT_FOUND


class LaunchError(SupervisordError):
    """An agent could not be started: missing executable, bad cwd, permission, ..."""

    code = ErrorCode.LAUNCH_FAILED


class LaunchRefused(SupervisordError):
    """The launch does not fit the host's memory budget now (``no_queue``) or ever (its
    ``request_mb`` is over the budget)."""

    code = ErrorCode.LAUNCH_REFUSED


class QueueFull(SupervisordError):
    """The admission queue holds ``[host] max_queued`` launches already."""

    code = ErrorCode.QUEUE_FULL


class PermissionDenied(SupervisordError):
    """The peer of a control connection is not allowed to use this daemon."""

    code = ErrorCode.PERMISSION_DENIED


class DaemonNotRunning(SupervisordError):
    """No daemon answers on the control socket of this home."""

    code = ErrorCode.DAEMON_NOT_RUNNING


class DaemonAlreadyRunning(SupervisordError):
    """Another daemon holds this home's lock."""

    code = ErrorCode.ALREADY_RUNNING


class ProtocolError(SupervisordError):
    """The daemon answered with something that is not a valid protocol response."""

    code = ErrorCode.PROTOCOL_ERROR


class RemoteError(SupervisordError):
    """The daemon answered a request with an error; ``code`` is the daemon's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LineTooLong(UsageError):
    """A request line exceeded the configured byte limit."""


class RequestError(UsageError):
    """A request that parsed far enough to have an id, so the error can answer it."""

    def __init__(
        self, request_id: Any, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.code = code


class CgroupError(SupervisordError):
    """A cgroup operation failed: cannot create, configure, place a process in or remove it."""

    code = ErrorCode.CGROUP_ERROR


class CgroupUnavailable(CgroupError):
    """``[cgroup] mode = "required"`` but no usable memory cgroup hierarchy is available."""

    code = ErrorCode.CGROUP_UNAVAILABLE
