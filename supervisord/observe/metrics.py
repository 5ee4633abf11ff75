"""Prometheus metrics: a registry fed by the supervisor's events, served over plain HTTP.

Counters and the escalation histogram follow the event bus (every alert, exit, queue and
restart event passes through it); gauges are refreshed from ``Supervisor.stats()`` and
``Supervisor.host_status()`` when a scrape arrives, so they are exactly current at scrape
time and nothing is computed while nobody scrapes. The refresh runs on the event loop (the
only place agent state may be read); rendering the exposition runs in a worker thread, so a
large scrape never holds up sampling or enforcement.

The HTTP side is ``metrics_http``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from contextlib import suppress
from typing import Any, Protocol, assert_never

import anyio
import structlog
from anyio.abc import TaskStatus
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
from supervisord.config.settings import Config
from supervisord.core.budget import Trigger
from supervisord.core.events import (
    AlertEvent,
    Event,
    ExitEvent,
    LaunchEvent,
    QueueEvent,
    RestartEvent,
)
from supervisord.core.kinds import AlertKind, EndReason, EventType, Level
from supervisord.core.units import MIB
from supervisord.host.sysmem import SystemMemory, system_memory
from supervisord.supervise.bus import Broadcaster

log = structlog.get_logger("supervisord.observe.metrics")

AGENT_LABELS = ("subprocess_id", "agent_type")
THRESHOLDS = ("warning_mb", "critical_mb", "max_mb")
# From a fast kill (tens of ms) to a stubborn tree that waits out a long grace period.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_EVENTS = (EventType.QUEUED, EventType.ADMITTED, EventType.CANCELLED)
UNKNOWN = "unknown"  # a label value outside the known few, kept to one series
# What can bring a run back: stop and the daemon's shutdown never do (core/restart).
RESTART_REASONS = sorted(set(EndReason) - {EndReason.STOPPED, EndReason.DAEMON_SHUTDOWN})


class StatsSource(Protocol):
    """What the metrics need of the supervisor (a protocol, so tests can pass a stand-in)."""

    bus: Broadcaster[Event]
    config: Config

    def stats(self) -> list[dict[str, Any]]: ...

    def host_status(self) -> dict[str, Any]: ...


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
        self.request = Gauge(
            "claude_pm_subprocess_request_bytes",
            "What the agent is taken to need of the host's budget (its request_mb)",
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
        self.host_budget = Gauge(
            "claude_pm_host_budget_bytes",
            "Memory budget of every agent together ([host] budget_mb)",
            registry=r,
        )
        self.host_reserve = Gauge(
            "claude_pm_host_reserve_bytes",
            "Available memory the host keeps for itself; below it agents are shed",
            registry=r,
        )
        self.host_used = Gauge(
            "claude_pm_host_agents_used_bytes",
            "Memory of every agent's tree together, now",
            registry=r,
        )
        self.host_requested = Gauge(
            "claude_pm_host_agents_requested_bytes",
            "What the running agents requested of the budget, together",
            registry=r,
        )
        self.host_held = Gauge(
            "claude_pm_host_agents_held_bytes",
            "What the running agents hold of the budget: each the larger of its use and request",
            registry=r,
        )
        self.queue_length = Gauge(
            "claude_pm_queue_length", "Launches waiting in the admission queue", registry=r
        )
        self.queue_capacity = Gauge(
            "claude_pm_queue_capacity",
            "Launches the admission queue holds at most ([host] max_queued)",
            registry=r,
        )
        self.sheds = Counter(
            "claude_pm_sheds",
            "Agents shed to keep the host within its memory budget, by trigger "
            "(budget, reserve, psi): one per host_pressure alert",
            ("trigger",),
            registry=r,
        )
        self.queue_events = Counter(
            "claude_pm_queue_events",
            "Admission queue events: queued, admitted, cancelled",
            ("event",),
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
            "Agents the daemon ended for memory, time or host pressure (reason: memory_limit, ...)",
            ("reason",),
            registry=r,
        )
        # Series that exist at 0 from the start: increase() cannot see a counter's first
        # step from absent to 1, so an alert on "kills in the last hour" would miss it.
        for kind in AlertKind:
            self.alerts.labels(kind.value, kind.level.name)
        for reason in EndReason:
            if reason.aborted:
                self.kills.labels(reason.value)
        for trigger in Trigger:
            self.sheds.labels(trigger.value)
        for queue_event in QUEUE_EVENTS:
            self.queue_events.labels(queue_event.value)
        self.launched = Counter(
            "claude_pm_agents_launched",
            "Agents launched (each run of a restarted agent counts)",
            ("agent_type",),
            registry=r,
        )
        self.finished = Counter(
            "claude_pm_agents_finished",
            "Agents whose tree is gone, by reason (each run of a restarted agent counts)",
            ("reason", "agent_type"),
            registry=r,
        )
        self.restarts = Counter(
            "claude_pm_agent_restarts",
            "Runs started again by a restart policy or `claude-pm restart`, by agent type and "
            "reason (why the run before ended, or restart): one per restarted event",
            ("agent_type", "reason"),
            registry=r,
        )
        self.restart_limits = Counter(
            "claude_pm_agent_restart_limit",
            "Agents failed for good (too many runs within restart_window_s), by agent type",
            ("agent_type",),
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
        self._signalled: set[str] = set()  # agents whose run's crossing latency is counted
        self._restarting_types: set[str] = set()  # their restart series exist at 0

    # -- events -----------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Count one event of the stream."""
        match event:
            case LaunchEvent():
                self.launched.labels(event.agent_type).inc()
                # At 0 from the type's first launch: an agent type often fails just once.
                self.restart_limits.labels(event.agent_type)
            case AlertEvent():
                self.alerts.labels(event.kind.value, event.level.name).inc()
                if event.kind is AlertKind.HOST_PRESSURE:
                    # Each shed is announced by exactly one host_pressure alert.
                    self.sheds.labels(_known(Trigger, (event.host or {}).get("trigger"))).inc()
                # The first signal carries it: SIGTERM, or SIGKILL when term_grace_s is 0. A
                # SIGKILL after the grace repeats the same figure and must not count twice.
                crossed = event.crossed_to_term_s
                if crossed is not None and event.subprocess_id not in self._signalled:
                    self._signalled.add(event.subprocess_id)
                    self.latency.labels("crossed_to_term").observe(crossed)
            case ExitEvent():
                self.finished.labels(event.reason.value, event.agent_type).inc()
                if event.memory.aborted:
                    self.kills.labels(event.reason.value).inc()
                if event.term_to_gone_s is not None:
                    self.latency.labels("term_to_gone").observe(event.term_to_gone_s)
                self._forget(event.subprocess_id)
            case QueueEvent():
                self.queue_events.labels(event.type.value).inc()
            case RestartEvent():
                self._restart(event)
            case _:  # A new kind of event must be counted here: mypy says so.
                assert_never(event)

    def _restart(self, event: RestartEvent) -> None:
        agent_type = event.agent_type
        if agent_type not in self._restarting_types:
            # At 0 from a type's first restart event (`restarting`, before its `restarted`).
            self._restarting_types.add(agent_type)
            for reason in RESTART_REASONS:
                self.restarts.labels(agent_type, reason)
            self.restart_limits.labels(agent_type)
        if event.type is EventType.RESTARTED:
            # The same id, a new run: its crossing latency counts again (even if the previous
            # run's exit was missed, as a resubscription can).
            self._signalled.discard(event.subprocess_id)
            self.restarts.labels(agent_type, _known(EndReason, event.reason)).inc()
        elif event.type is EventType.RESTART_LIMIT:
            self.restart_limits.labels(agent_type).inc()

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
            request_mb = _number(agent.get("request_mb"))
            if request_mb is not None:
                self.request.labels(sid, agent_type).set(request_mb * MIB)
            level = Level.__members__.get(str(agent.get("level")), Level.OK)
            self.level.labels(sid, agent_type).set(level.value)
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

    def refresh_host(self, host: Mapping[str, Any] | None) -> None:
        """Set the budget and queue gauges from a ``host_status()`` snapshot; a figure it
        lacks keeps its last value."""
        if not host:
            return
        for gauge, key in (
            (self.host_budget, "budget_mb"),
            (self.host_reserve, "reserve_mb"),
            (self.host_used, "used_mb"),
            (self.host_requested, "requested_mb"),
            (self.host_held, "held_mb"),
        ):
            mb = _number(host.get(key))
            if mb is not None:
                gauge.set(mb * MIB)
        for gauge, key in (
            (self.queue_length, "queue_length"),
            (self.queue_capacity, "max_queued"),
        ):
            count = _number(host.get(key))
            if count is not None:
                gauge.set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _forget(self, sid: str) -> None:
        self._signalled.discard(sid)
        agent_type = self._agents.pop(sid, None)
        if agent_type is None:
            return
        gauges = [self.memory, self.peak, self.level, self.processes, self.request]
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


def _known(values: type[enum.StrEnum], value: Any) -> str:
    """``value`` when it is one of ``values``, else ``UNKNOWN``: bounded label values."""
    try:
        return values(str(value)).value
    except ValueError:
        return UNKNOWN


def refresh_from(metrics: Metrics, source: StatsSource) -> None:
    """Snapshot the supervisor into the gauges; call on the event loop, never from a thread."""
    metrics.refresh(
        source.stats(),
        system_memory(),
        sample_s=_number(getattr(source, "last_sample_s", None)),
        monitoring=source.config.limits.enabled,
    )
    metrics.refresh_host(source.host_status())


async def follow(
    metrics: Metrics,
    bus: Broadcaster[Event],
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
