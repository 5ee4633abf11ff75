"""The control protocol for both ends, free of I/O: framing, requests, responses, errors.

One JSON object a line each way. Requests are ``{"id": ..., "cmd": ..., "args": {...}}``;
responses ``{"id": ..., "ok": true, "result": ...}`` or ``{"id": ..., "ok": false,
"error": {"code": ..., "message": ...}}``; a subscription streams ``{"id": ..., "event": ...}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisord.core.errors import (
    DaemonNotRunning,
    ErrorCode,
    LineTooLong,
    NotFoundError,
    ProtocolError,
    RemoteError,
    RequestError,
    UsageError,
)

PROTOCOL_VERSION = 1


class LineBuffer:
    """Splits a byte stream into lines, refusing to hold more than ``max_bytes`` of one line."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes) -> tuple[list[bytes], LineTooLong | None]:
        """The complete lines in the stream so far, and the error of an over-long one.

        Lines before an over-long one still count: a client that sent a request and then a
        line too long gets its answer before the refusal. Nothing is read past the error.
        """
        self._buffer += data
        lines: list[bytes] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            if end > self.max_bytes:
                return lines, self._too_long()
            lines.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
        if len(self._buffer) > self.max_bytes:
            return lines, self._too_long()
        return lines, None

    def _too_long(self) -> LineTooLong:
        self._buffer.clear()
        return LineTooLong(f"request line over {self.max_bytes} bytes")


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    cmd: str
    args: Mapping[str, Any]


# Per command: argument -> (allowed JSON kinds, required).
Spec = dict[str, tuple[tuple[str, ...], bool]]
COMMANDS: dict[str, Spec] = {
    "hello": {},
    "ping": {},
    "status": {},
    "stats": {"subprocess_id": (("string",), False), "pss": (("boolean",), False)},
    "launch": {
        "agent_type": (("string",), True),
        "command": (("list of strings",), False),
        "task": (("string",), False),
        "cwd": (("string",), False),
        "env": (("object of strings",), False),
        "limits": (("object",), False),
        "timeout_s": (("number", "null"), False),
        "force": (("boolean",), False),
        "request_mb": (("number",), False),
        "priority": (("integer",), False),
        "on_pressure": (("string",), False),
        "no_queue": (("boolean",), False),
        "restart": (("string",), False),
        "restart_delay_s": (("number",), False),
        "restart_backoff": (("number",), False),
        "restart_delay_max_s": (("number",), False),
        "restart_jitter": (("number",), False),
        "restart_limit": (("integer",), False),
        "restart_window_s": (("number",), False),
        "restart_reset_s": (("number",), False),
        "resume_command": (("list of strings",), False),
        "session_pattern": (("string",), False),
        "after": (("list of strings",), False),
    },
    "queue": {},
    "cancel": {"subprocess_id": (("string",), True)},
    "stop": {"subprocess_id": (("string",), True), "grace_s": (("number",), False)},
    "kill": {"subprocess_id": (("string",), True)},
    "restart": {"subprocess_id": (("string",), True), "grace_s": (("number",), False)},
    "watch": {
        "pid": (("integer",), True),
        "agent_type": (("string",), False),
        "limits": (("object",), False),
        "timeout_s": (("number", "null"), False),
    },
    "unwatch": {"subprocess_id": (("string",), True)},
    "run": {
        "agent_type": (("string",), True),
        "command": (("list of strings",), True),
        "limits": (("object",), False),
        "timeout_s": (("number", "null"), False),
    },
    "subscribe": {"levels": (("list of strings",), False), "types": (("list of strings",), False)},
    "reload": {"env": (("object of strings",), False)},
    "shutdown": {"leave_agents": (("boolean",), False)},
}


def decode_request(line: bytes) -> Request:
    """Parse and validate one request line; :class:`UsageError` says what is wrong."""
    try:
        message = json.loads(line)
    except RecursionError:
        raise UsageError("request is nested too deeply to parse") from None
    except ValueError as exc:  # Bad JSON or UTF-8, or an integer over Python's digit limit.
        raise UsageError(f"request is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise UsageError(f"request must be a JSON object, not {_kind(message)}")
    request_id = message.get("id")
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError(request_id, 'request needs "cmd", a string naming the command')
    if cmd not in COMMANDS:
        raise RequestError(
            request_id,
            f"unknown command {cmd!r}; allowed: {', '.join(sorted(COMMANDS))}",
            code=ErrorCode.UNKNOWN_COMMAND,
        )
    args = message.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RequestError(request_id, f'"args" must be an object, not {_kind(args)}')
    try:
        validate_args(cmd, args)
    except UsageError as exc:
        raise RequestError(request_id, str(exc)) from None
    return Request(id=request_id, cmd=cmd, args=args)


def validate_args(cmd: str, args: Mapping[str, Any]) -> None:
    spec = COMMANDS[cmd]
    unknown = sorted(set(args) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise UsageError(f"{cmd}: unknown argument {unknown[0]!r}; allowed: {allowed}")
    for name, (kinds, required) in spec.items():
        if name not in args:
            if required:
                raise UsageError(f"{cmd}: missing required argument {name!r} ({kinds[0]})")
            continue
        if not any(_is_kind(args[name], kind) for kind in kinds):
            raise UsageError(
                f"{cmd}: argument {name!r} must be {' or '.join(kinds)}, "
                f"got {_kind(args[name])} {_short(args[name])}"
            )


def _is_kind(value: Any, kind: str) -> bool:
    match kind:
        case "string":
            return isinstance(value, str)
        case "boolean":
            return isinstance(value, bool)
        case "null":
            return value is None
        case "number":
            return (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "object":
            return isinstance(value, dict)
        case "list of strings":
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        case "object of strings":
            return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    raise AssertionError(kind)


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def encode(message: Mapping[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


def ok(request_id: Any, result: Any) -> bytes:
    return encode({"id": request_id, "ok": True, "result": result})


def error(request_id: Any, code: str, message: str) -> bytes:
    return encode({"id": request_id, "ok": False, "error": {"code": code, "message": message}})


def event(request_id: Any, payload: Mapping[str, Any]) -> bytes:
    return encode({"id": request_id, "event": payload})


# -- the client's end ---------------------------------------------------------------------


def encode_request(request_id: int, cmd: str, args: Mapping[str, Any]) -> bytes:
    """A client's request line; arguments that are None are left out."""
    payload = {
        "id": request_id,
        "cmd": cmd,
        "args": {k: v for k, v in args.items() if v is not None},
    }
    return encode(payload)


def decode_response(line: bytes, socket_path: Path) -> Any:
    """The result of a response line, or the daemon's error raised as an exception: an empty
    line (closed connection) is :class:`DaemonNotRunning`, ``not_found`` is
    :class:`NotFoundError`, any other code a :class:`RemoteError` carrying it."""
    if not line:
        raise DaemonNotRunning(f"the daemon at {socket_path} closed the connection")
    try:
        response = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"daemon sent a line that is not JSON: {exc}") from None
    if not isinstance(response, dict):
        raise ProtocolError(f"daemon sent {response!r}, not a response object")
    if response.get("ok"):
        return response.get("result")
    error = response.get("error") or {}
    code, message = str(error.get("code", "error")), str(error.get("message", response))
    if code == ErrorCode.NOT_FOUND:
        raise NotFoundError(message)
    raise RemoteError(code, message)


def decode_event(line: bytes) -> dict[str, Any]:
    """The event of a subscription's line."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"daemon sent an event line that is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), dict):
        raise ProtocolError(f"daemon sent {_short(message)}, not an event")
    event: dict[str, Any] = message["event"]
    return event
