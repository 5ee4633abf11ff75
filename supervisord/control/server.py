"""The control server: JSON lines over a Unix stream socket.

Every connection is bounded: who may connect (SO_PEERCRED: the daemon's user and root), how
many at once, how long a line may be, how long a client may sit idle and how long it may
take to finish a line it started. A bad client gets an error or a closed connection; the
daemon and every other client carry on.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.abc import ByteStream, SocketListener, TaskStatus

from supervisord.config.settings import DaemonSettings
from supervisord.control import authz, protocol
from supervisord.control.commands import Commands
from supervisord.control.peers import Peer, allowed, peer_of
from supervisord.control.protocol import LineBuffer, Request
from supervisord.core.errors import ErrorCode, RequestError, SupervisordError
from supervisord.core.events import AlertEvent, Event
from supervisord.supervise.bus import Broadcaster

log = structlog.get_logger("supervisord.control.server")
RECEIVE_CHUNK = 65536


class ControlServer:
    def __init__(
        self, commands: Commands, settings: DaemonSettings, events: Broadcaster[Event]
    ) -> None:
        self.commands = commands
        self.settings = settings
        self.events = events
        self.connections = 0
        self.allowed_gids = frozenset(grp.getgrnam(g).gr_gid for g in settings.allowed_groups)
        self._listener: SocketListener | None = None

    async def serve(
        self, listener: SocketListener, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until the listener is closed (``stop_accepting``), then let connections finish."""
        self._listener = listener
        async with anyio.create_task_group() as connections:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                connections.start_soon(self.connection, stream)

    async def stop_accepting(self) -> None:
        """New clients find no daemon from here on; connections already open carry on."""
        if self._listener is not None:
            await self._listener.aclose()

    async def connection(self, stream: ByteStream) -> None:
        self.connections += 1
        try:
            async with stream:
                await self._converse(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError):
            pass  # The client went away; nothing of the daemon's depends on it.
        except Exception:  # A bug must cost one connection, never the daemon.
            log.exception("connection_failed")
        finally:
            self.connections -= 1

    async def _converse(self, stream: ByteStream) -> None:
        peer = peer_of(stream)
        refusal = self._refusal(peer)
        if refusal is not None:
            await self._send(stream, refusal)
            return
        buffer = LineBuffer(self.settings.max_line_bytes)
        # A started line must be finished by this deadline, however slowly its bytes trickle in.
        line_deadline = 0.0
        while True:
            if buffer.pending:
                limit, what = self.settings.line_timeout_s, "finish its request line"
                timeout = max(0.0, line_deadline - anyio.current_time())
            else:
                limit, what = self.settings.idle_timeout_s, "send a request"
                timeout = limit
            data = b""
            with anyio.move_on_after(timeout):
                try:
                    data = await stream.receive(RECEIVE_CHUNK)
                except anyio.EndOfStream:
                    return
            if not data:
                await self._send(
                    stream,
                    protocol.error(
                        None,
                        ErrorCode.TIMEOUT,
                        f"closing: client took over {limit:g} s to {what}",
                    ),
                )
                return
            was_pending = buffer.pending
            lines, too_long = buffer.feed(data)
            for line in lines:
                if line.strip() and not await self._request(stream, line, peer):
                    return
            if too_long is not None:
                await self._send(
                    stream, protocol.error(None, too_long.code, f"closing: {too_long}")
                )
                return
            if buffer.pending and (lines or not was_pending):
                line_deadline = anyio.current_time() + self.settings.line_timeout_s

    def _refusal(self, peer: Peer) -> bytes | None:
        """The answer for a connection that is not served at all, if this one is not."""
        if self.connections > self.settings.max_connections:
            return protocol.error(
                None,
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"the daemon serves at most {self.settings.max_connections} connections "
                "(daemon.max_connections); try again later",
            )
        if not allowed(peer, self.allowed_gids):
            log.warning("peer_refused", uid=peer.uid, pid=peer.pid)
            return protocol.error(
                None,
                ErrorCode.PERMISSION_DENIED,
                f"uid {peer.uid} may not use this daemon: only uid {os.geteuid()}, root and "
                f"members of daemon.allowed_groups {list(self.settings.allowed_groups)} may",
            )
        return None

    async def _request(self, stream: ByteStream, line: bytes, peer: Peer) -> bool:
        """Answer one line; False when the connection is done (a subscription ended)."""
        try:
            request = protocol.decode_request(line)
        except RequestError as exc:
            await self._send(stream, protocol.error(exc.request_id, exc.code, str(exc)))
            return True
        except SupervisordError as exc:
            await self._send(stream, protocol.error(None, exc.code, str(exc)))
            return True
        if request.cmd == "subscribe":
            await self._subscribe(stream, request, peer)
            return False
        try:
            result = await self.commands.handle(request, peer)
        except SupervisordError as exc:
            response = protocol.error(request.id, exc.code, str(exc))
        except Exception as exc:  # A bug must cost one request, never the daemon.
            log.exception("request_failed", cmd=request.cmd)
            response = protocol.error(
                request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
            )
        else:
            response = protocol.ok(request.id, result)
        await self._send(stream, response)
        return True

    async def _subscribe(self, stream: ByteStream, request: Request, peer: Peer) -> None:
        wanted = EventFilter.of(request.args, owner_uid=authz.owner_filter(peer.uid))
        async with self.events.subscribe() as events:
            await self._send(stream, protocol.ok(request.id, {"subscribed": True}))
            async with anyio.create_task_group() as tg:

                async def until_closed() -> None:
                    # Anything the client sends now, or its hang-up, ends the subscription.
                    with suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        await stream.receive(1)
                    tg.cancel_scope.cancel()

                tg.start_soon(until_closed)
                async for event in events:
                    if wanted(event):
                        await self._send(stream, protocol.event(request.id, event.as_dict()))
                tg.cancel_scope.cancel()

    async def _send(self, stream: ByteStream, data: bytes) -> None:
        # A client that stops reading must not hold this task forever.
        with anyio.fail_after(self.settings.line_timeout_s):
            await stream.send(data)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What a ``subscribe`` asked for: event types, and alert levels (other types pass); and
    whose agents the subscriber may hear of (``owner_uid``; None: everyone's)."""

    types: frozenset[str] = frozenset()
    levels: frozenset[str] = frozenset()
    owner_uid: int | None = None

    @classmethod
    def of(cls, args: Mapping[str, Any], owner_uid: int | None = None) -> EventFilter:
        types, levels = frozenset(args.get("types") or ()), frozenset(args.get("levels") or ())
        return cls(types, levels, owner_uid)

    def __call__(self, event: Event) -> bool:
        if self.owner_uid is not None and event.owner_uid != self.owner_uid:
            return False
        if self.types and event.type.value not in self.types:
            return False
        return not (
            self.levels and isinstance(event, AlertEvent) and event.level.name not in self.levels
        )
