"""Clients of the control socket: ``Client`` (blocking) and ``AsyncClient`` (anyio).

Both find the daemon of a home the way the daemon itself picks its socket, and turn the
daemon's error responses into :class:`RemoteError` (or :class:`NotFoundError` for
``not_found``), and a missing daemon into :class:`DaemonNotRunning`.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, Self

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisord.config.home import Home, configured_socket, find_home
from supervisord.config.settings import environment_overrides
from supervisord.control import protocol
from supervisord.core.errors import (
    DaemonNotRunning,
    NotFoundError,
)
from supervisord.core.kinds import EventType

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
NOT_RUNNING_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK}


def resolve_socket(home: Home | None = None) -> Path:
    """The control socket of ``home`` (default: found from here), as the daemon binds it:
    from ``[daemon] socket`` alone, so a client works whatever else the file holds."""
    home = home or Home(find_home())
    return home.socket_path(configured_socket(home.config_file))


def _not_running(socket_path: Path, exc: OSError) -> DaemonNotRunning:
    return DaemonNotRunning(
        f"no daemon answers at {socket_path} ({exc.strerror or exc}); "
        "start one with `claude-pm init`"
    )


class _Commands:
    """One method per protocol command; subclasses supply ``request``."""

    def request(self, cmd: str, **args: Any) -> Any:
        raise NotImplementedError

    def launch_args(
        self,
        agent_type: str,
        command: list[str] | tuple[str, ...] | None = None,
        *,
        task: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        limits: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        force: bool | None = None,
        request_mb: float | None = None,
        priority: int | None = None,
        on_pressure: str | None = None,
        no_queue: bool | None = None,
        restart: Mapping[str, Any] | None = None,
        after: list[str] | tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """``restart``: restart keys (``restart``, ``restart_delay_s``, ``resume_command``,
        ...) over the type's policy; ``after``: ids that must end with exit code 0 first."""
        return {
            **(restart or {}),
            "after": list(after) if after else None,
            "request_mb": request_mb,
            "priority": priority,
            "on_pressure": on_pressure,
            "no_queue": no_queue or None,
            "agent_type": agent_type,
            "command": list(command) if command else None,
            "task": task,
            "cwd": cwd,
            "env": dict(env) if env else None,
            "limits": dict(limits) if limits else None,
            "timeout_s": timeout_s,
            "force": force,
        }


class Client(_Commands):
    """A blocking client; one connection, opened on first use."""

    def __init__(
        self, socket_path: Path | str | None = None, *, timeout_s: float | None = 60.0
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else resolve_socket()
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                if exc.errno in NOT_RUNNING_ERRNOS:
                    raise _not_running(self.socket_path, exc) from None
                raise
            self._sock, self._reader = sock, sock.makefile("rb")
        return self._sock

    def _readline(self) -> bytes:
        line: bytes = self._reader.readline(MAX_RESPONSE_BYTES)
        return line

    def request(self, cmd: str, **args: Any) -> Any:
        sock = self._connect()
        # The daemon may have answered and closed first (a refusal): read that answer below.
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(protocol.encode_request(next(self._ids), cmd, args))
        try:
            line = self._readline()
        except ConnectionResetError:
            line = b""
        if not line:
            self.close()
        return protocol.decode_response(line, self.socket_path)

    def hello(self) -> dict[str, Any]:
        return dict(self.request("hello"))

    def ping(self) -> bool:
        return bool(self.request("ping")["pong"])

    def status(self) -> dict[str, Any]:
        return dict(self.request("status"))

    def stats(self, subprocess_id: str | None = None, *, pss: bool = False) -> dict[str, Any]:
        """One agent's figures, or every agent's; ``pss``: add each tree's PSS (costly)."""
        return dict(self.request("stats", subprocess_id=subprocess_id, pss=pss or None))

    def launch(
        self, agent_type: str, command: list[str] | None = None, **kw: Any
    ) -> dict[str, Any]:
        return dict(self.request("launch", **self.launch_args(agent_type, command, **kw)))

    def stop(self, subprocess_id: str, grace_s: float | None = None) -> dict[str, Any]:
        return dict(self.request("stop", subprocess_id=subprocess_id, grace_s=grace_s))

    def kill(self, subprocess_id: str) -> dict[str, Any]:
        return dict(self.request("kill", subprocess_id=subprocess_id))

    def restart(self, subprocess_id: str, grace_s: float | None = None) -> dict[str, Any]:
        return dict(self.request("restart", subprocess_id=subprocess_id, grace_s=grace_s))

    def watch(
        self,
        pid: int,
        agent_type: str | None = None,
        *,
        limits: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Put a running process's tree under supervision (the caller must own it)."""
        args = {"pid": pid, "agent_type": agent_type, "timeout_s": timeout_s}
        return dict(self.request("watch", **args, limits=dict(limits) if limits else None))

    def unwatch(self, subprocess_id: str) -> dict[str, Any]:
        return dict(self.request("unwatch", subprocess_id=subprocess_id))

    def run(
        self,
        agent_type: str,
        command: list[str],
        *,
        limits: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Put this very process under supervision, before it execs ``command``."""
        args = {"agent_type": agent_type, "command": command, "timeout_s": timeout_s}
        return dict(self.request("run", **args, limits=dict(limits) if limits else None))

    def queue(self) -> dict[str, Any]:
        return dict(self.request("queue"))

    def cancel(self, subprocess_id: str) -> dict[str, Any]:
        return dict(self.request("cancel", subprocess_id=subprocess_id))

    def reload(self, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        env = environment_overrides() if env is None else env
        return dict(self.request("reload", env=dict(env)))

    def shutdown(self, *, leave_agents: bool = False) -> dict[str, Any]:
        return dict(self.request("shutdown", leave_agents=leave_agents))

    def subscribe(
        self, *, levels: list[str] | None = None, types: list[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Subscribe now; the iterator yields events from here on, until the daemon goes away.

        The request is sent before this returns, so nothing that happens after the call is
        missed, however late the caller starts iterating.
        """
        self.request("subscribe", levels=levels, types=types)
        assert self._sock is not None
        self._sock.settimeout(None)
        return self._events()

    def _events(self) -> Iterator[dict[str, Any]]:
        try:
            while line := self._readline():
                yield protocol.decode_event(line)
        finally:
            self.close()

    def launch_and_wait(
        self,
        agent_type: str,
        command: list[str] | None = None,
        *,
        on_launched: Callable[[dict[str, Any]], None] | None = None,
        **kw: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Launch, then wait for the agent's tree to be gone: (launch result, stats record).

        A queued launch is waited for through the queue (and through a requeue after being
        shed); one cancelled while it waits ends the wait with the ``cancelled`` event. The
        exit is subscribed to first, on a second connection, so it cannot slip by.
        """
        with Client(self.socket_path, timeout_s=None) as watcher:
            events = watcher.subscribe(types=[EventType.EXIT, EventType.CANCELLED])
            result = self.launch(agent_type, command, **kw)
            if on_launched is not None:
                on_launched(result)
            for event in events:
                if event.get("subprocess_id") != result["subprocess_id"]:
                    continue
                # A run followed by another (requeued, or restarted) is not the end yet.
                if not event.get("requeued") and event.get("next_restart_s") is None:
                    return result, event
        raise DaemonNotRunning("the daemon went away before the agent ended")

    def follow_log(
        self, subprocess_id: str, path: Path, write: Callable[[bytes], None], poll_s: float = 0.2
    ) -> None:
        """Copy an agent's output log to ``write``, then what it appends, until the agent is
        gone for good (or the daemon is): through its restarts, its log is one file. The
        tail written after that is copied too. When the daemon
        rotates the log (or recreates it), the rest of the old file is copied, then the new
        one from its start, as ``tail -F`` does."""
        f = open(path, "rb")  # noqa: SIM115 - reopened across rotations below
        try:
            while True:
                chunk = f.read()
                if chunk:
                    write(chunk)
                    continue
                if _replaced(f, path):
                    f.close()
                    f = open(path, "rb")  # noqa: SIM115
                    continue
                try:
                    going_on = self._will_run(subprocess_id)
                except DaemonNotRunning:
                    going_on = False
                if not going_on:
                    write(f.read())
                    return
                time.sleep(poll_s)
        finally:
            f.close()

    def _will_run(self, subprocess_id: str) -> bool:
        """It runs, or waits to run again (between runs, queued, after others)."""
        try:
            self.stats(subprocess_id)
        except NotFoundError:
            listing = self.queue()
            rows = (*listing["queue"], *listing.get("restarting", []), *listing.get("waiting", []))
            return any(row["subprocess_id"] == subprocess_id for row in rows)
        return True


def _replaced(f: Any, path: Path) -> bool:
    """Whether ``path`` now names another file than the open ``f`` (rotated or recreated)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False  # between a rotation and the next write: keep reading the old one
    was = os.fstat(f.fileno())
    return (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino)


class AsyncClient(_Commands):
    """The anyio client: ``async with AsyncClient() as c: await c.status()``."""

    def __init__(self, socket_path: Path | str | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else resolve_socket()
        self._stream: SocketStream | None = None
        self._buffered: BufferedByteReceiveStream | None = None
        self._ids = itertools.count(1)
        self._lock = anyio.Lock()

    async def __aenter__(self) -> Self:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = self._buffered = None

    async def _connect(self) -> tuple[SocketStream, BufferedByteReceiveStream]:
        if self._stream is None or self._buffered is None:
            try:
                self._stream = await anyio.connect_unix(self.socket_path)
            except OSError as exc:
                if exc.errno in NOT_RUNNING_ERRNOS:
                    raise _not_running(self.socket_path, exc) from None
                raise
            self._buffered = BufferedByteReceiveStream(self._stream)
        return self._stream, self._buffered

    async def _readline(self) -> bytes:
        assert self._buffered is not None
        try:
            return await self._buffered.receive_until(b"\n", MAX_RESPONSE_BYTES)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
            return b""

    async def request(self, cmd: str, **args: Any) -> Any:
        async with self._lock:
            stream, _ = await self._connect()
            # A refusal (permission, too many connections) is answered before the daemon
            # reads anything: a failed send still leaves that answer to be read.
            with suppress(anyio.BrokenResourceError, OSError):
                await stream.send(protocol.encode_request(next(self._ids), cmd, args))
            return protocol.decode_response(await self._readline(), self.socket_path)

    async def hello(self) -> dict[str, Any]:
        return dict(await self.request("hello"))

    async def ping(self) -> bool:
        return bool((await self.request("ping"))["pong"])

    async def status(self) -> dict[str, Any]:
        return dict(await self.request("status"))

    async def stats(self, subprocess_id: str | None = None, *, pss: bool = False) -> dict[str, Any]:
        return dict(await self.request("stats", subprocess_id=subprocess_id, pss=pss or None))

    async def launch(
        self, agent_type: str, command: list[str] | None = None, **kw: Any
    ) -> dict[str, Any]:
        return dict(await self.request("launch", **self.launch_args(agent_type, command, **kw)))

    async def stop(self, subprocess_id: str, grace_s: float | None = None) -> dict[str, Any]:
        return dict(await self.request("stop", subprocess_id=subprocess_id, grace_s=grace_s))

    async def kill(self, subprocess_id: str) -> dict[str, Any]:
        return dict(await self.request("kill", subprocess_id=subprocess_id))

    async def restart(self, subprocess_id: str, grace_s: float | None = None) -> dict[str, Any]:
        return dict(await self.request("restart", subprocess_id=subprocess_id, grace_s=grace_s))

    async def queue(self) -> dict[str, Any]:
        return dict(await self.request("queue"))

    async def cancel(self, subprocess_id: str) -> dict[str, Any]:
        return dict(await self.request("cancel", subprocess_id=subprocess_id))

    async def reload(self, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        env = environment_overrides() if env is None else env
        return dict(await self.request("reload", env=dict(env)))

    async def shutdown(self, *, leave_agents: bool = False) -> dict[str, Any]:
        return dict(await self.request("shutdown", leave_agents=leave_agents))

    async def subscribe(
        self, *, levels: list[str] | None = None, types: list[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Subscribe now (``events = await c.subscribe()``), then ``async for e in events``."""
        await self.request("subscribe", levels=levels, types=types)
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        while line := await self._readline():
            yield protocol.decode_event(line)
