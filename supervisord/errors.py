"""The project's exceptions: one base class, a few precise subclasses.

Each carries a stable ``code`` that the control protocol sends to clients, so a client can
react to the kind of failure without parsing the message.
"""

from __future__ import annotations


class SupervisordError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "error"


class ConfigError(SupervisordError):
    """A configuration value is invalid; the message names key, value and what is allowed."""

    code = "invalid_config"


class UsageError(SupervisordError):
    """A request or command line is malformed: wrong command, argument or type."""

    code = "bad_request"


class NotFoundError(SupervisordError):
    """No agent has the given subprocess_id."""

    code = "not_found"


class LaunchError(SupervisordError):
    """An agent could not be started: missing executable, bad cwd, permission, ..."""

    code = "launch_failed"


class LaunchRefused(SupervisordError):
    """The system has too little available memory for the agent's warning threshold."""

    code = "launch_refused"


class PermissionDenied(SupervisordError):
    """The peer of a control connection is not allowed to use this daemon."""

    code = "permission_denied"


class DaemonNotRunning(SupervisordError):
    """No daemon answers on the control socket of this home."""

    code = "daemon_not_running"


class DaemonAlreadyRunning(SupervisordError):
    """Another daemon holds this home's lock."""

    code = "already_running"


class ProtocolError(SupervisordError):
    """The daemon answered with something that is not a valid protocol response."""

    code = "protocol_error"


class RemoteError(SupervisordError):
    """The daemon answered a request with an error; ``code`` is the daemon's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
