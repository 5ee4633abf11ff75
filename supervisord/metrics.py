"""Prometheus metrics: a registry fed by the supervisor's events, served over plain HTTP.

Counters and the escalation histogram follow the event bus (every alert and exit passes
through it); gauges are refreshed from ``Supervisor.stats()`` when a scrape arrives, so they
are exactly current at scrape time and nothing is computed while nobody scrapes. The refresh
runs on the event loop (the only place agent state may be read); rendering the exposition
runs in a worker thread, so a large scrape never holds up sampling or enforcement.

The HTTP side is a deliberately tiny anyio server: one request per connection, a bounded
request head read under a deadline, a cap on concurrent connections. It answers ``GET`` and
``HEAD`` for ``/metrics`` (and ``/`` with a pointer to it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import suppress
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from supervisord import __version__
from supervisord.bus import Broadcaster
from supervisord.config import Config
from supervisord.config_observe import MetricsSettings
from supervisord.errors import ConfigError
from supervisord.sysmem import SystemMemory, system_memory

log = structlog.get_logger("supervisord.metrics")

AGENT_LABELS = ("subprocess_id", "agent_type")
MIB = 1024 * 1024
LEVELS = {"OK": 0, "WARNING": 1, "CRITICAL": 2}
THRESHOLDS = ("warning_mb", "critical_mb", "max_mb")
KNOWN_ALERTS = (
    ("memory_warning", "WARNING"),
    ("memory_critical", "CRITICAL"),
    ("sigterm_sent", "CRITICAL"),
    ("sigkill_sent", "CRITICAL"),
    ("timeout", "CRITICAL"),
    ("launch_refused", "WARNING"),
    ("recovered", "WARNING"),
)
KILL_REASONS = ("memory_limit", "timeout", "oom_killed")
# From a fast kill (tens of ms) to a stubborn tree that waits out a long grace period.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# generate_latest writes the classic text format; every name here is valid in it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16


class StatsSource(Protocol):
    """What the metrics need of the supervisor (a protocol, so tests can pass a stand-in)."""

    bus: Broadcaster
    config: Config

    def stats(self) -> list[dict[str, Any]]: ...


class Metrics:
    """The daemon's metrics in a registry of their own (not the process-global default).

    Memory is exposed in bytes, Prometheus's base unit (Grafana scales it to MiB or GiB);
    ``guide_names`` adds the guide's two series in MiB and agent count under its own names.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, guide_names: bool = True
    ) -> None:
        # `_created` series double every counter's output for nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.memory = Gauge(
            "claude_pm_subprocess_memory_bytes",
            "Memory of the agent's whole process tree (RSS sum, or PSS near a threshold)",
            AGENT_LABELS,
            registry=r,
        )
        self.peak = Gauge(
            "claude_pm_subprocess_peak_memory_bytes",
            "Highest memory of the agent's tree since launch",
            AGENT_LABELS,
            registry=r,
        )
        self.limit = Gauge(
            "claude_pm_subprocess_limit_bytes",
            "The agent's thresholds (threshold: warning, critical, max)",
            (*AGENT_LABELS, "threshold"),
            registry=r,
        )
        self.level = Gauge(
            "claude_pm_subprocess_level",
            "The agent's escalation level: 0 OK, 1 WARNING, 2 CRITICAL",
            AGENT_LABELS,
            registry=r,
        )
        self.processes = Gauge(
            "claude_pm_subprocess_processes",
            "Processes in the agent's tree",
            AGENT_LABELS,
            registry=r,
        )
        self.agents = Gauge("claude_pm_subprocesses", "Number of live agents", registry=r)
        self.guide_memory: Gauge | None = None
        self.guide_count: Gauge | None = None
        if guide_names:
            self.guide_memory = Gauge(
                "claude_pm_subprocess_memory_mb",
                "Subprocess memory usage in MB (the guide's name; MiB)",
                AGENT_LABELS,
                registry=r,
            )
            self.guide_count = Gauge(
                "claude_pm_subprocess_count",
                "Number of active subprocesses (the guide's name)",
                registry=r,
            )
        self.available = Gauge(
            "claude_pm_system_memory_available_bytes",
            "System memory available for new allocations",
            registry=r,
        )
        self.total = Gauge("claude_pm_system_memory_total_bytes", "System memory", registry=r)
        self.sample_s = Gauge(
            "claude_pm_sample_duration_seconds",
            "Duration of the last /proc scan of every agent's tree",
            registry=r,
        )
        self.monitoring = Gauge(
            "claude_pm_monitoring_enabled",
            "1 when memory alerts and signals are enabled, 0 when only sampling",
            registry=r,
        )
        self.alerts = Counter(
            "claude_pm_alerts",
            "Alerts written to memory-alerts.log, by event and level",
            ("event", "level"),
            registry=r,
        )
        self.kills = Counter(
            "claude_pm_kills",
            "Agents the daemon ended for memory or time (reason: memory_limit, timeout, ...)",
            ("reason",),
            registry=r,
        )
        # Series that exist at 0 from the start: increase() cannot see a counter's first
        # step from absent to 1, so an alert on "kills in the last hour" would miss it.
        for event, level in KNOWN_ALERTS:
            self.alerts.labels(event, level)
        for reason in KILL_REASONS:
            self.kills.labels(reason)
        self.launched = Counter(
            "claude_pm_agents_launched", "Agents launched", ("agent_type",), registry=r
        )
        self.finished = Counter(
            "claude_pm_agents_finished",
            "Agents whose tree is gone, by reason",
            ("reason", "agent_type"),
            registry=r,
        )
        self.latency = Histogram(
            "claude_pm_escalation_latency_seconds",
            "Enforcement latency: phase crossed_to_term (limit crossed to SIGTERM sent) and "
            "term_to_gone (SIGTERM sent to the whole tree gone)",
            ("phase",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        Info("claude_pm_build", "Version of the daemon", registry=r).info({"version": __version__})
        # The daemon's own CPU, memory and fds: a supervisor that leaks is worth a graph too.
        ProcessCollector(registry=r)
        # Per-agent label values in use, so an agent's series can be removed when it ends.
        self._agents: dict[str, str] = {}
        self._signalled: set[str] = set()  # agents whose crossing latency is counted

    # -- events -----------------------------------------------------------------------------

    def observe(self, event: Mapping[str, Any]) -> None:
        """Count one bus event (``launch``, ``alert`` or ``exit``)."""
        kind = event.get("type")
        agent_type = str(event.get("agent_type", ""))
        if kind == "launch":
            self.launched.labels(agent_type).inc()
        elif kind == "alert":
            self.alerts.labels(str(event.get("event")), str(event.get("level"))).inc()
            # The first signal carries it: SIGTERM, or SIGKILL when term_grace_s is 0. A
            # SIGKILL after the grace repeats the same figure and must not count twice.
            crossed = _number(event.get("crossed_to_term_s"))
            sid = str(event.get("subprocess_id"))
            if crossed is not None and sid not in self._signalled:
                self._signalled.add(sid)
                self.latency.labels("crossed_to_term").observe(crossed)
        elif kind == "exit":
            reason = str(event.get("reason"))
            self.finished.labels(reason, agent_type).inc()
            stats = event.get("memory_stats")
            if isinstance(stats, Mapping) and stats.get("aborted"):
                self.kills.labels(reason).inc()
            gone = _number(event.get("term_to_gone_s"))
            if gone is not None:
                self.latency.labels("term_to_gone").observe(gone)
            self._forget(str(event.get("subprocess_id")))

    # -- gauges -----------------------------------------------------------------------------

    def refresh(
        self,
        agents: Iterable[Mapping[str, Any]],
        system: SystemMemory,
        *,
        sample_s: float | None = None,
        monitoring: bool = True,
    ) -> None:
        """Set every gauge from a ``stats()`` snapshot; series of agents not in it go away."""
        seen: set[str] = set()
        for agent in agents:
            sid, agent_type = str(agent["subprocess_id"]), str(agent["agent_type"])
            if self._agents.get(sid, agent_type) != agent_type:
                self._forget(sid)
            self._agents[sid] = agent_type
            seen.add(sid)
            current_mb = float(agent["current_mb"])
            self.memory.labels(sid, agent_type).set(current_mb * MIB)
            if self.guide_memory is not None:
                self.guide_memory.labels(sid, agent_type).set(current_mb)
            self.peak.labels(sid, agent_type).set(float(agent["peak_mb"]) * MIB)
            self.level.labels(sid, agent_type).set(LEVELS.get(str(agent.get("level")), 0))
            self.processes.labels(sid, agent_type).set(
                int(agent.get("process_count", len(agent.get("tree_pids", ()))))
            )
            limits = agent.get("limits") or {}
            for key in THRESHOLDS:
                value = _number(limits.get(key))
                if value is not None:
                    self.limit.labels(sid, agent_type, key.removesuffix("_mb")).set(value * MIB)
        for sid in set(self._agents) - seen:
            self._forget(sid)
        self.agents.set(len(seen))
        if self.guide_count is not None:
            self.guide_count.set(len(seen))
        self.available.set(system.available_mb * MIB)
        self.total.set(system.total_mb * MIB)
        self.monitoring.set(1 if monitoring else 0)
        if sample_s is not None:
            self.sample_s.set(sample_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _forget(self, sid: str) -> None:
        self._signalled.discard(sid)
        agent_type = self._agents.pop(sid, None)
        if agent_type is None:
            return
        gauges = [self.memory, self.peak, self.level, self.processes]
        if self.guide_memory is not None:
            gauges.append(self.guide_memory)
        for gauge in gauges:
            with suppress(KeyError):
                gauge.remove(sid, agent_type)
        for key in THRESHOLDS:
            with suppress(KeyError):
                self.limit.remove(sid, agent_type, key.removesuffix("_mb"))


def _number(value: Any) -> float | None:
    """The value as a float when it is a number (the lead's optional event fields may be absent)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def refresh_from(metrics: Metrics, source: StatsSource) -> None:
    """Snapshot the supervisor into the gauges; call on the event loop, never from a thread."""
    metrics.refresh(
        source.stats(),
        system_memory(),
        sample_s=_number(getattr(source, "last_sample_s", None)),
        monitoring=source.config.limits.enabled,
    )


async def follow(
    metrics: Metrics,
    bus: Broadcaster,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Count every bus event; reports started once subscribed, so none is missed after."""
    while True:
        async with bus.subscribe() as events:
            task_status.started()
            task_status = anyio.TASK_STATUS_IGNORED
            async for event in events:
                metrics.observe(event)
        # The bus cuts off a subscriber that falls a whole buffer behind; take up again.
        log.warning("metrics_resubscribed")


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
