"""The daemon as the MCP tools reach it: through the project's client, as the calling user.

Every call opens its own connection, so a daemon that restarted between two calls is simply
found again. When none answers, one is started the way ``claude-pm init`` starts it. Whatever
goes wrong comes back as a :class:`ToolError` whose text begins with the daemon's error code:
the model reads ``not_found: no agent ...``, never a traceback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver.exceptions import ToolError

from supervisord.config.home import Home
from supervisord.config.settings import load_config
from supervisord.control import background
from supervisord.control.client import AsyncClient, resolve_socket
from supervisord.core.errors import (
    DaemonNotRunning,
    ErrorCode,
    NotFoundError,
    SupervisordError,
)
from supervisord.host.sysmem import enclosing_mb

# A request the daemon answers in milliseconds; this bound only catches a wedged daemon.
REQUEST_TIMEOUT_S = 30.0


def tool_error(exc: BaseException) -> ToolError:
    """``code: message``, with the daemon's code where it gave one."""
    if isinstance(exc, SupervisordError):
        return ToolError(f"{exc.code}: {exc}")
    if isinstance(exc, TimeoutError):
        return ToolError(
            f"{ErrorCode.TIMEOUT}: the daemon did not answer within {REQUEST_TIMEOUT_S:g} s"
        )
    return ToolError(f"{ErrorCode.ERROR}: {exc}")


class Daemon:
    """Requests to the daemon of ``home``, starting it when none answers."""

    def __init__(
        self,
        home: Home,
        *,
        start: Callable[[Home], background.Started] = background.start_daemon,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.home = home
        self._start = start
        self.timeout_s = timeout_s
        self._starting = anyio.Lock()

    @property
    def socket_path(self) -> Path:
        return resolve_socket(self.home)

    async def ensure_running(self) -> None:
        """Start the daemon as ``init`` would (home, config check, detached daemon)."""
        async with self._starting:
            await anyio.to_thread.run_sync(self._start_now)

    def _start_now(self) -> None:
        background.ensure_home(self.home)
        # A broken config is refused here with its message, as `init` refuses it.
        load_config(self.home.config_file, enclosing_mb=enclosing_mb())
        self._start(self.home)

    @asynccontextmanager
    async def connected(self, *, start: bool = True) -> AsyncIterator[AsyncClient]:
        """A connection; a daemon that is not running is started first (unless not
        ``start``). Only the connect is retried, never a request: a launch the daemon may
        have taken must not run twice."""
        client = AsyncClient(self.socket_path)
        try:
            await client.__aenter__()
        except DaemonNotRunning:
            if not start:
                raise
            await self.ensure_running()
            await client.__aenter__()
        try:
            yield client
        finally:
            await client.aclose()

    async def request(self, cmd: str, **args: Any) -> Any:
        """The daemon's answer to ``cmd``; its errors as :class:`ToolError`."""
        try:
            async with self.connected() as client:
                with anyio.fail_after(self.timeout_s):
                    return await client.request(cmd, **args)
        except (SupervisordError, TimeoutError, OSError) as exc:
            raise tool_error(exc) from exc

    async def find(self, cmd: str, **args: Any) -> Any | None:
        """As :meth:`request`, with None for ``not_found``."""
        try:
            return await self.request(cmd, **args)
        except ToolError as exc:
            if isinstance(exc.__cause__, NotFoundError):
                return None
            raise
