"""The metrics' HTTP side: a deliberately tiny anyio server for Prometheus scrapes.

One request per connection, a bounded request head read under a deadline, a cap on concurrent
connections. It answers ``GET`` and ``HEAD`` for ``/metrics`` (and ``/`` with a pointer to
it). Gauges are refreshed on the event loop when a scrape arrives; the exposition is rendered
in a worker thread, so a large scrape never holds up sampling or enforcement.
"""

from __future__ import annotations

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisord.config.observe import MetricsSettings
from supervisord.core.errors import ConfigError
from supervisord.observe.metrics import Metrics, StatsSource, follow, refresh_from

log = structlog.get_logger("supervisord.observe.metrics_http")

# generate_latest writes the classic text format; every name here is valid in it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16


class MetricsServer:
    """``GET /metrics`` on ``[metrics] listen``; one request per connection."""

    def __init__(self, metrics: Metrics, source: StatsSource, settings: MetricsSettings) -> None:
        self.metrics = metrics
        self.source = source
        self.settings = settings
        self.head_timeout_s = HEAD_TIMEOUT_S
        self._connections = anyio.Semaphore(MAX_CONNECTIONS)
        self._render_limiter = anyio.CapacityLimiter(1)
        self.address: tuple[str, int] | None = None

    async def serve(
        self, *, task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        address = self.settings.address
        assert address is not None, "serve() needs [metrics] listen"
        host, port = address
        try:
            listener = await anyio.create_tcp_listener(
                local_host=host, local_port=port, reuse_port=False
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen = {self.settings.listen!r}: cannot listen there "
                f"({exc.strerror or exc}); choose another address or port, or free it"
            ) from None
        async with listener:
            bound_port = port
            for one in listener.listeners:
                bound_port = int(one.extra(SocketAttribute.local_address)[1])
            self.address = (host, bound_port)
            log.info("metrics_listening", host=host, port=bound_port, path="/metrics")
            task_status.started(self.address)
            await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            if self._connections.value == 0:
                # Over the cap: close at once rather than queue, so scrapes cannot pile up.
                return
            async with self._connections:
                try:
                    await self._respond(stream)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # The scraper went away mid-answer; nothing to tell it.
                except Exception:
                    # This task runs in the daemon's task group: a bug here must cost one
                    # scrape, never the enforcement beside it.
                    log.exception("metrics_request_failed")

    async def _respond(self, stream: SocketStream) -> None:
        buffered = BufferedByteReceiveStream(stream)
        try:
            with anyio.fail_after(self.head_timeout_s):
                head = await buffered.receive_until(b"\r\n\r\n", MAX_HEAD_BYTES)
        except (TimeoutError, anyio.IncompleteRead, anyio.DelimiterNotFound, anyio.EndOfStream):
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3:
            await _send(stream, 400, b"bad request\n")
            return
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await _send(stream, 405, b"only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
            return
        if path == "/metrics":
            refresh_from(self.metrics, self.source)
            body = await anyio.to_thread.run_sync(self.metrics.render, limiter=self._render_limiter)
            await _send(stream, 200, body, CONTENT_TYPE, head_only=method == "HEAD")
        elif path == "/":
            page = b"claude-pm-supervisord: metrics at /metrics\n"
            await _send(stream, 200, page, head_only=method == "HEAD")
        else:
            await _send(stream, 404, b"not found; metrics are at /metrics\n")


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _send(
    stream: SocketStream,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> None:
    headers = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    await stream.send(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        await stream.send(body)


async def serve(
    source: StatsSource,
    settings: MetricsSettings,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon's metrics: follow the bus, serve scrapes; reports the bound address."""
    metrics = Metrics(guide_names=settings.guide_names)
    server = MetricsServer(metrics, source, settings)
    async with anyio.create_task_group() as tg:
        await tg.start(follow, metrics, source.bus)
        address = await tg.start(server.serve)
        task_status.started(address)
