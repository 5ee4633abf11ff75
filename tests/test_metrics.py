"""Prometheus metrics: the registry, the HTTP endpoint, promtool, and a real Prometheus."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisord.config.home import Home
from supervisord.config.observe import MetricsSettings
from supervisord.config.settings import Config, load_config
from supervisord.core.budget import Budget, Pressure, Trigger
from supervisord.core.errors import ConfigError
from supervisord.core.events import AlertEvent, Event, QueueEvent
from supervisord.core.kinds import AlertKind, EndReason, EventType
from supervisord.host.sysmem import SystemMemory
from supervisord.observe.metrics import Metrics, follow
from supervisord.observe.metrics_http import MetricsServer
from supervisord.supervise.bus import Broadcaster
from tests import typed_events as ev
from tests.conftest import DaemonProcess, Events, require_tool, simagent, write_config

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus-rules.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
MIB = 1024 * 1024
SYSTEM = SystemMemory(
    total_mb=16000.0, available_mb=9000.0, used_mb=7000.0, percent=43.8, free_mb=1
)
GUIDE_LINT = {
    "claude_pm_subprocess_memory_mb": "abbreviated units",
    "claude_pm_subprocess_count": '"_count" suffix',
}
needs_prometheus = pytest.mark.usefixtures("prometheus_installed")


@pytest.fixture
def prometheus_installed() -> None:
    """Debian's prometheus package: skipped without it locally, a failure in CI."""
    for tool in ("prometheus", "promtool"):
        require_tool(tool, "a real scrape and promtool's checks (Debian's prometheus package)")


def agent(sid: str, mb: float, level: str = "OK", agent_type: str | None = None) -> dict[str, Any]:
    return {
        "subprocess_id": sid,
        "agent_type": agent_type or sid.split("_")[0],
        "current_mb": mb,
        "peak_mb": mb + 5,
        "level": level,
        "process_count": 3,
        "limits": {"warning_mb": 100.0, "critical_mb": 150.0, "max_mb": 200.0},
    }


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def names_with_label(text: str, label: str, value_: str) -> set[str]:
    return {name for name, labels in samples(text) if (label, value_) in labels}


@dataclass
class FakeSupervisor:
    """What the metrics read of a supervisor, with agents a test sets."""

    bus: Broadcaster[Event] = field(default_factory=Broadcaster)
    config: Config = field(default_factory=Config)
    agents: list[dict[str, Any]] = field(default_factory=list)
    last_sample_s: float = 0.004
    host: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> list[dict[str, Any]]:
        return list(self.agents)

    def host_status(self) -> dict[str, Any]:
        return dict(self.host)


def host_status(**figures: Any) -> dict[str, Any]:
    """``Supervisor.host_status()`` as the daemon answers it, with figures a test sets."""
    return {
        "budget_mb": 3072.0,
        "reserve_mb": 1024.0,
        "pressure_psi_some_avg10": None,
        "used_mb": 1234.5,
        "requested_mb": 1600.0,
        "held_mb": 1700.0,
        "free_mb": 1372.0,
        "queue_length": 3,
        "max_queued": 100,
        "shedding": None,
        "sheds": {},
        "kernel_ceiling": False,
        **figures,
    }


def shed_alert(sid: str, trigger: Trigger) -> AlertEvent:
    """The host_pressure alert of a shed, its figures made as the supervisor makes them."""
    pressure = Pressure(trigger, "agents use 3100.0 MB", 3100.0, 900.0, None)
    return replace(
        ev.alert("host_pressure", sid),
        reason=EndReason.HOST_PRESSURE,
        host=pressure.figures(Budget(budget_mb=3072, reserve_mb=1024)),
    )


def queue_event(kind: EventType, sid: str = "eng_cccccccccccc") -> QueueEvent:
    return QueueEvent(kind, sid, "eng", request_mb=500.0, priority=0, reason="needs 500 MB")


# -- the registry ------------------------------------------------------------------------------


async def seen_launch_of(metrics: Metrics, agent_type: str) -> None:
    """Until the launch of ``agent_type``, published last, was counted: the bus is in order,
    so everything published before it has been seen too."""
    with anyio.fail_after(5):
        while (
            value(
                metrics.render().decode(), "claude_pm_agents_launched_total", agent_type=agent_type
            )
            != 1
        ):
            await anyio.sleep(0.01)


async def test_bus_events_drive_counters_and_the_latency_histogram() -> None:
    metrics = Metrics()
    bus: Broadcaster[Event] = Broadcaster()
    sid = "hog_0123456789ab"
    async with anyio.create_task_group() as tg:
        await tg.start(follow, metrics, bus)
        bus.publish(ev.launch(sid))
        for kind in ("memory_warning", "memory_critical"):
            bus.publish(ev.alert(kind, sid))
        bus.publish(ev.alert("sigterm_sent", sid, crossed_to_term_s=0.04))
        # After the grace: SIGKILL repeats the same figure, which must not count twice.
        bus.publish(ev.alert("sigkill_sent", sid, crossed_to_term_s=0.04))
        bus.publish(ev.exit_(sid, "memory_limit", term_to_gone_s=0.3))
        # With term_grace_s = 0 the first signal is SIGKILL, and it carries the crossing time.
        bus.publish(ev.alert("sigkill_sent", "k_1", crossed_to_term_s=0.2))
        # An agent that ended on its own: counted as finished, never as a kill; no latency.
        bus.publish(ev.exit_(sid, "exited"))
        with anyio.fail_after(5):
            while (
                value(
                    metrics.render().decode(),
                    "claude_pm_agents_finished_total",
                    reason="exited",
                    agent_type="hog",
                )
                != 1
            ):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    text = metrics.render().decode()
    hist = "claude_pm_escalation_latency_seconds"
    assert value(text, f"{hist}_count", phase="crossed_to_term") == 2
    assert value(text, f"{hist}_sum", phase="crossed_to_term") == pytest.approx(0.24)
    assert value(text, f"{hist}_bucket", phase="crossed_to_term", le="0.05") == 1
    assert value(text, f"{hist}_bucket", phase="crossed_to_term", le="0.25") == 2
    assert value(text, f"{hist}_bucket", phase="crossed_to_term", le="0.025") == 0
    assert value(text, f"{hist}_count", phase="term_to_gone") == 1
    assert value(text, f"{hist}_bucket", phase="term_to_gone", le="0.25") == 0
    assert value(text, f"{hist}_bucket", phase="term_to_gone", le="0.5") == 1
    assert value(text, "claude_pm_kills_total", reason="memory_limit") == 1
    assert value(text, "claude_pm_kills_total", reason="timeout") == 0  # present from the start
    assert value(text, "claude_pm_alerts_total", event="sigterm_sent", level="CRITICAL") == 1
    assert value(text, "claude_pm_alerts_total", event="memory_warning", level="WARNING") == 1
    assert value(text, "claude_pm_agents_launched_total", agent_type="hog") == 1
    assert (
        value(text, "claude_pm_agents_finished_total", reason="memory_limit", agent_type="hog") == 1
    )


def test_an_ended_agents_series_are_removed() -> None:
    metrics = Metrics()
    metrics.refresh([], SYSTEM)
    baseline = metrics.render().decode()
    a, b = agent("eng_aaaaaaaaaaaa", 42.5, "WARNING"), agent("qa_bbbbbbbbbbbb", 10.0)
    metrics.refresh([a, b], SYSTEM, sample_s=0.003)
    text = metrics.render().decode()
    labels = {"subprocess_id": "eng_aaaaaaaaaaaa", "agent_type": "eng"}
    assert value(text, "claude_pm_subprocess_memory_bytes", **labels) == 42.5 * MIB
    assert value(text, "claude_pm_subprocess_memory_mb", **labels) == 42.5
    assert value(text, "claude_pm_subprocess_peak_memory_bytes", **labels) == 47.5 * MIB
    assert value(text, "claude_pm_subprocess_limit_bytes", threshold="max", **labels) == 200 * MIB
    assert value(text, "claude_pm_subprocess_level", **labels) == 1
    assert value(text, "claude_pm_subprocess_processes", **labels) == 3
    assert value(text, "claude_pm_subprocesses") == 2
    assert value(text, "claude_pm_subprocess_count") == 2
    assert value(text, "claude_pm_system_memory_available_bytes") == 9000 * MIB
    assert value(text, "claude_pm_sample_duration_seconds") == 0.003

    # An exit event removes the agent at once; a snapshot without it does too.
    metrics.observe(ev.exit_(a["subprocess_id"], agent_type="eng"))
    text = metrics.render().decode()
    assert names_with_label(text, "subprocess_id", a["subprocess_id"]) == set()
    assert names_with_label(text, "subprocess_id", b["subprocess_id"])
    metrics.refresh([], SYSTEM)
    assert names_with_label(metrics.render().decode(), "subprocess_id", b["subprocess_id"]) == set()

    # Many agents later, the exposition is no longer: no label grows with every agent.
    sizes = []
    for n in range(300):
        sid = f"churn_{n:012x}"
        metrics.refresh([agent(sid, float(n))], SYSTEM)
        metrics.observe(ev.exit_(sid, "exited"))
        sizes.append(len(metrics.render().splitlines()))
    assert len(set(sizes)) == 1
    after = metrics.render().decode()
    assert [line for line in after.splitlines() if "subprocess_id=" in line] == []
    assert len(after.splitlines()) > len(baseline.splitlines())  # eng/churn counters now exist

    # Without the guide's names only base-unit series remain.
    plain = Metrics(guide_names=False)
    plain.refresh([a], SYSTEM)
    names = {name for name, _ in samples(plain.render().decode())}
    assert "claude_pm_subprocess_memory_bytes" in names
    assert not names & set(GUIDE_LINT)


async def test_sheds_by_trigger_and_queue_events_follow_the_bus() -> None:
    metrics = Metrics()
    bus: Broadcaster[Event] = Broadcaster()
    async with anyio.create_task_group() as tg:
        await tg.start(follow, metrics, bus)
        for kind in (EventType.QUEUED, EventType.QUEUED, EventType.ADMITTED, EventType.CANCELLED):
            bus.publish(queue_event(kind))
        bus.publish(shed_alert("low_aaaaaaaaaaaa", Trigger.BUDGET))
        bus.publish(ev.exit_("low_aaaaaaaaaaaa", "host_pressure"))
        bus.publish(shed_alert("low_bbbbbbbbbbbb", Trigger.PSI))
        bus.publish(shed_alert("low_cccccccccccc", Trigger.BUDGET))
        # Figures without a trigger the daemon knows: counted, under one bounded label value.
        bus.publish(replace(shed_alert("low_dddddddddddd", Trigger.BUDGET), host=None))
        bus.publish(ev.launch("last_eeeeeeeeeeee"))  # the bus is in order: all before it seen
        await seen_launch_of(metrics, "last")
        tg.cancel_scope.cancel()
    text = metrics.render().decode()
    assert value(text, "claude_pm_queue_events_total", event="queued") == 2
    assert value(text, "claude_pm_queue_events_total", event="admitted") == 1
    assert value(text, "claude_pm_queue_events_total", event="cancelled") == 1
    assert value(text, "claude_pm_sheds_total", trigger="budget") == 2
    assert value(text, "claude_pm_sheds_total", trigger="psi") == 1
    assert value(text, "claude_pm_sheds_total", trigger="reserve") == 0
    assert value(text, "claude_pm_sheds_total", trigger="unknown") == 1
    assert value(text, "claude_pm_alerts_total", event="host_pressure", level="CRITICAL") == 4
    # The shed agent's exit is a kill and a finish like any other, by its reason.
    assert value(text, "claude_pm_kills_total", reason="host_pressure") == 1
    labels = {"reason": "host_pressure", "agent_type": "low"}
    assert value(text, "claude_pm_agents_finished_total", **labels) == 1


async def test_restarts_by_type_and_reason_and_the_crossing_latency_once_per_run() -> None:
    metrics = Metrics()
    bus: Broadcaster[Event] = Broadcaster()
    sid = "hog_0123456789ab"
    async with anyio.create_task_group() as tg:
        await tg.start(follow, metrics, bus)
        bus.publish(ev.launch(sid))
        for run in (1, 2):  # each run crosses max_mb: SIGTERM, then SIGKILL after the grace
            bus.publish(ev.alert("sigterm_sent", sid, crossed_to_term_s=0.04))
            bus.publish(ev.alert("sigkill_sent", sid, crossed_to_term_s=0.04))
            bus.publish(ev.exit_(sid, "memory_limit", run=run, next_restart_s=0.8 * run))
            bus.publish(ev.restart("restarting", sid, run=run, delay_s=0.8 * run))
            bus.publish(ev.restart("restarted", sid, run=run + 1))
        # Run 3's exit never reached this subscriber (a resubscription skips events): its
        # `restarted` alone starts the count for run 4 afresh.
        bus.publish(ev.alert("sigterm_sent", sid, crossed_to_term_s=0.04))
        bus.publish(ev.restart("restarted", sid, run=4, reason="exited"))
        bus.publish(ev.alert("sigterm_sent", sid, crossed_to_term_s=0.04))
        # `claude-pm restart`, then a reason from a newer daemon: one bounded label value.
        bus.publish(ev.exit_(sid, "restart", run=4, next_restart_s=0.0))
        bus.publish(ev.restart("restarted", sid, run=5, reason="restart"))
        bus.publish(ev.restart("restarted", sid, run=6, reason="cosmic_ray"))
        bus.publish(ev.exit_(sid, "exited", run=6))
        bus.publish(ev.restart("restart_limit", sid, run=6, reason="exited", exit_code=1))
        bus.publish(ev.alert("restart_limit", sid))
        bus.publish(ev.launch("calm_aaaaaaaaaaaa"))  # the bus is in order: all before it seen
        await seen_launch_of(metrics, "calm")
        tg.cancel_scope.cancel()
    text = metrics.render().decode()
    restarts = "claude_pm_agent_restarts_total"
    assert value(text, restarts, agent_type="hog", reason="memory_limit") == 2
    assert value(text, restarts, agent_type="hog", reason="exited") == 1
    assert value(text, restarts, agent_type="hog", reason="restart") == 1
    assert value(text, restarts, agent_type="hog", reason="unknown") == 1
    # Every reason that can bring a run back exists at 0 from the type's first restart event.
    assert value(text, restarts, agent_type="hog", reason="timeout") == 0
    assert value(text, restarts, agent_type="hog", reason="stopped") is None
    assert value(text, "claude_pm_agent_restart_limit_total", agent_type="hog") == 1
    assert value(text, "claude_pm_alerts_total", event="restart_limit", level="CRITICAL") == 1
    # A type that never restarted: its limit series at 0 from its launch, no restart series.
    assert value(text, "claude_pm_agent_restart_limit_total", agent_type="calm") == 0
    assert names_with_label(text, "agent_type", "calm") == {
        "claude_pm_agents_launched_total",
        "claude_pm_agent_restart_limit_total",
    }
    # Runs 1, 2, 3 and 4 each had their first signal counted, and only that one.
    hist = "claude_pm_escalation_latency_seconds"
    assert value(text, f"{hist}_count", phase="crossed_to_term") == 4
    finished = "claude_pm_agents_finished_total"
    assert value(text, finished, reason="memory_limit", agent_type="hog") == 2
    assert value(text, finished, reason="restart", agent_type="hog") == 1
    assert value(text, "claude_pm_kills_total", reason="memory_limit") == 2
    assert value(text, "claude_pm_kills_total", reason="restart") is None  # asked for, no kill


def test_an_agents_series_go_between_runs_and_come_back_with_the_next() -> None:
    metrics = Metrics()
    sid = "eng_aaaaaaaaaaaa"
    labels = {"subprocess_id": sid, "agent_type": "eng"}
    metrics.refresh([{**agent(sid, 180.0, "CRITICAL"), "run": 1, "restarts": 0}], SYSTEM)
    metrics.observe(ev.exit_(sid, "memory_limit", agent_type="eng", next_restart_s=1.0))
    metrics.observe(ev.restart("restarting", sid, delay_s=1.0))
    # Between runs the agent has no tree: no memory figure of the run that ended lingers.
    assert names_with_label(metrics.render().decode(), "subprocess_id", sid) == set()
    metrics.observe(ev.restart("restarted", sid, run=2))
    metrics.refresh([{**agent(sid, 12.0), "run": 2, "restarts": 1}], SYSTEM)
    text = metrics.render().decode()
    assert value(text, "claude_pm_subprocess_memory_bytes", **labels) == 12.0 * MIB
    assert value(text, "claude_pm_subprocess_level", **labels) == 0
    assert value(text, "claude_pm_subprocesses") == 1


def test_host_gauges_and_each_agents_request() -> None:
    metrics = Metrics()
    metrics.refresh_host(host_status())
    text = metrics.render().decode()
    assert value(text, "claude_pm_host_budget_bytes") == 3072 * MIB
    assert value(text, "claude_pm_host_reserve_bytes") == 1024 * MIB
    assert value(text, "claude_pm_host_agents_used_bytes") == 1234.5 * MIB
    assert value(text, "claude_pm_host_agents_requested_bytes") == 1600 * MIB
    assert value(text, "claude_pm_host_agents_held_bytes") == 1700 * MIB
    assert value(text, "claude_pm_queue_length") == 3
    assert value(text, "claude_pm_queue_capacity") == 100
    # A snapshot without some figures leaves those as they were.
    metrics.refresh_host({"queue_length": 0})
    metrics.refresh_host(None)
    text = metrics.render().decode()
    assert value(text, "claude_pm_queue_length") == 0
    assert value(text, "claude_pm_host_budget_bytes") == 3072 * MIB

    sid = "eng_aaaaaaaaaaaa"
    metrics.refresh(
        [{**agent(sid, 40.0), "request_mb": 512.0}, agent("qa_bbbbbbbbbbbb", 1.0)], SYSTEM
    )
    text = metrics.render().decode()
    labels = {"subprocess_id": sid, "agent_type": "eng"}
    assert value(text, "claude_pm_subprocess_request_bytes", **labels) == 512 * MIB
    # No request_mb in the row (an older row shape): no series rather than a made-up 0.
    qa = {"subprocess_id": "qa_bbbbbbbbbbbb", "agent_type": "qa"}
    assert value(text, "claude_pm_subprocess_request_bytes", **qa) is None
    metrics.observe(ev.exit_(sid, "host_pressure", agent_type="eng"))
    assert value(metrics.render().decode(), "claude_pm_subprocess_request_bytes", **labels) is None


# -- the HTTP endpoint -------------------------------------------------------------------------


@asynccontextmanager
async def metrics_server(source: FakeSupervisor) -> AsyncIterator[MetricsServer]:
    server = MetricsServer(Metrics(), source, MetricsSettings(listen="127.0.0.1:0"))
    server.head_timeout_s = 1.0
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def test_http_endpoint_serves_fresh_values_and_refuses_the_rest() -> None:
    source = FakeSupervisor(agents=[agent("eng_aaaaaaaaaaaa", 12.0)], host=host_status())
    async with metrics_server(source) as server, httpx.AsyncClient() as http:
        assert server.address is not None
        base = f"http://127.0.0.1:{server.address[1]}"
        # A client that starts a request and never finishes it must not hold up a scrape.
        stalled = await anyio.connect_tcp("127.0.0.1", server.address[1])
        await stalled.send(b"GET /metrics HTTP/1.1\r\n")
        with anyio.fail_after(5):
            response = await http.get(f"{base}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert (
            value(
                response.text,
                "claude_pm_subprocess_memory_mb",
                subprocess_id="eng_aaaaaaaaaaaa",
                agent_type="eng",
            )
            == 12.0
        )
        assert value(response.text, "claude_pm_queue_length") == 3
        source.agents = [agent("eng_aaaaaaaaaaaa", 30.0)]  # read at scrape time, not cached
        source.host = host_status(used_mb=2900.0, queue_length=0)
        response = await http.get(f"{base}/metrics?x=1")
        assert value(response.text, "claude_pm_host_agents_used_bytes") == 2900 * MIB
        assert value(response.text, "claude_pm_queue_length") == 0
        assert (
            value(
                response.text,
                "claude_pm_subprocess_memory_mb",
                subprocess_id="eng_aaaaaaaaaaaa",
                agent_type="eng",
            )
            == 30.0
        )
        head = await http.head(f"{base}/metrics")
        assert head.status_code == 200
        assert head.content == b""
        assert (await http.get(f"{base}/")).status_code == 200
        assert (await http.get(f"{base}/nope")).status_code == 404
        assert (await http.post(f"{base}/metrics")).status_code == 405
        # The stalled client is dropped after head_timeout_s, without an answer.
        with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
            await stalled.receive()
        await stalled.aclose()


async def test_an_address_in_use_fails_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = MetricsSettings(listen=f"127.0.0.1:{port}")
        server = MetricsServer(Metrics(), FakeSupervisor(), settings)
        with pytest.raises(ConfigError, match=rf"metrics\.listen = '127\.0\.0\.1:{port}'"):
            await server.serve()


def test_metrics_config_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[metrics]\nlisten = "[::1]:9464"\nguide_names = false\n')
    config = load_config(path, {})
    assert config.metrics.address == ("::1", 9464)
    assert config.metrics.guide_names is False
    assert load_config(None, {}).metrics.listen is None  # off by default
    for text, match in (
        ('listen = "9464"', r"metrics\.listen = '9464' is not allowed; give \"host:port\""),
        ('listen = "localhost:99999"', r"metrics\.listen = 'localhost:99999'"),
        ("listen = 9464", r"metrics\.listen = 9464"),
        ('port = "1"', r"\[metrics\]: unknown key 'port'; allowed: guide_names, listen"),
        ('guide_names = "yes"', r"metrics\.guide_names = 'yes' is not allowed; give true or false"),
    ):
        path.write_text(f"[metrics]\n{text}\n")
        with pytest.raises(ConfigError, match=match):
            load_config(path, {})


# -- promtool ----------------------------------------------------------------------------------


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def busy_metrics(*, guide_names: bool) -> Metrics:
    metrics = Metrics(guide_names=guide_names)
    metrics.refresh([agent("eng_aaaaaaaaaaaa", 12.0), agent("qa_bbbbbbbbbbbb", 99.0)], SYSTEM)
    metrics.observe(ev.launch("eng_cccccccccccc"))
    metrics.observe(ev.alert("sigterm_sent", crossed_to_term_s=0.1))
    metrics.observe(ev.exit_("x", "timeout", agent_type="eng", term_to_gone_s=1.0))
    metrics.refresh_host(host_status())
    metrics.observe(queue_event(EventType.QUEUED))
    metrics.observe(shed_alert("qa_bbbbbbbbbbbb", Trigger.RESERVE))
    metrics.observe(ev.restart("restarted", "eng_aaaaaaaaaaaa", run=2, reason="exited"))
    metrics.observe(ev.restart("restart_limit", "eng_aaaaaaaaaaaa", run=5, reason="exited"))
    return metrics


@needs_prometheus
def test_promtool_check_metrics_passes_on_the_exposition() -> None:
    result = promtool("check", "metrics", stdin=busy_metrics(guide_names=False).render())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
    # The guide's two names are served by default for its users; promtool's linter objects
    # to exactly those two (the exposition parses: exit 3 is "lint problems", 1 a failure).
    result = promtool("check", "metrics", stdin=busy_metrics(guide_names=True).render())
    assert result.returncode == 3, result.stdout + result.stderr
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(problems) == len(GUIDE_LINT), problems
    for name, why in GUIDE_LINT.items():
        assert any(p.startswith(name + " ") and why in p for p in problems), problems


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ",".join(f'{k}="{v}"' for k, v in {"job": "claude-pm", **labels}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def alert(eval_time: str, name: str, *expected: tuple[dict[str, str], dict[str, str]]) -> Any:
    return {
        "eval_time": eval_time,
        "alertname": name,
        "exp_alerts": [
            {"exp_labels": labels, "exp_annotations": notes} for labels, notes in expected
        ],
    }


H1, H2 = "h1:9464", "h2:9464"
ENG = {"instance": H1, "subprocess_id": "eng_1", "agent_type": "eng"}
QA = {"instance": H1, "subprocess_id": "qa_2", "agent_type": "qa"}
# promtool's unit tests of the rules: synthetic series at one-minute steps, expected alerts.
RULES_TESTS = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                series("claude_pm_subprocess_memory_bytes", "100 950 960 970 980 990", **ENG),
                series("claude_pm_subprocess_memory_bytes", "100x5", **QA),
                series("claude_pm_subprocess_limit_bytes", "1000x5", threshold="max", **ENG),
                series("claude_pm_subprocess_limit_bytes", "1000x5", threshold="max", **QA),
                series("claude_pm_kills_total", "0 0 1 1 1 1", instance=H1, reason="memory_limit"),
                series("claude_pm_kills_total", "0x5", instance=H2, reason="memory_limit"),
                # A shed: ClaudePMAgentsShed's, so ClaudePMAgentsKilled leaves it out.
                series("claude_pm_kills_total", "0 0 1 1 1 1", instance=H2, reason="host_pressure"),
                series("up", "1x5", instance=H1),
                series("up", "1 1 0 0 0 0", instance=H2),
                series("claude_pm_system_memory_available_bytes", "5000x10", instance=H1),
                series("claude_pm_system_memory_total_bytes", "10000x10", instance=H1),
            ],
            "alert_rule_test": [
                alert(
                    "3m",
                    "ClaudePMAgentNearLimit",
                    (
                        {"severity": "warning", "job": "claude-pm", **ENG},
                        {
                            "summary": "Agent eng_1 on h1:9464 is near its memory limit",
                            "description": "eng agent eng_1 has used 97% of its max_mb for a "
                            "minute; the daemon will SIGTERM its whole tree when it reaches 100%.",
                        },
                    ),
                ),
                alert(
                    "3m",
                    "ClaudePMAgentsKilled",
                    (
                        {
                            "severity": "warning",
                            "job": "claude-pm",
                            "instance": H1,
                            "reason": "memory_limit",
                        },
                        {
                            "summary": "1 agent(s) killed on h1:9464 in the last hour "
                            "(memory_limit)",
                            "description": "The daemon ended agents for memory_limit. "
                            "`claude-pm report health` and `claude-pm events` on that host "
                            "tell which, and `claude-pm report thresholds` suggests limits.",
                        },
                    ),
                ),
                alert("1m", "ClaudePMDaemonDown"),
                alert(
                    "4m",
                    "ClaudePMDaemonDown",
                    (
                        {"severity": "critical", "job": "claude-pm", "instance": H2},
                        {
                            "summary": "claude-pm daemon on h2:9464 is not answering scrapes",
                            "description": "While the daemon is down its agents run unwatched "
                            "(they keep running; a restarted daemon re-adopts them). Check "
                            "`systemctl status claude-pm-supervisord` there.",
                        },
                    ),
                ),
                alert("4m", "ClaudePMSystemMemoryLow"),  # 50% available: nothing to say
            ],
        },
        {
            # Restarts: eng agents on h1 come back six times in three minutes, then one of
            # them reaches its restart limit; qa restarts now and then, which is no storm.
            "interval": "1m",
            "input_series": [
                series(
                    "claude_pm_agent_restarts_total",
                    "0 2 4 5 5x20",
                    instance=H1,
                    agent_type="eng",
                    reason="memory_limit",
                ),
                series(
                    "claude_pm_agent_restarts_total",
                    "0 0 0 1 1x20",
                    instance=H1,
                    agent_type="eng",
                    reason="exited",
                ),
                series(
                    "claude_pm_agent_restarts_total",
                    "0 1 1 2 2x20",
                    instance=H1,
                    agent_type="qa",
                    reason="exited",
                ),
                series(
                    "claude_pm_agent_restart_limit_total",
                    "0 0 0 0 1x20",
                    instance=H1,
                    agent_type="eng",
                ),
                series("claude_pm_agent_restart_limit_total", "0x24", instance=H1, agent_type="qa"),
            ],
            "alert_rule_test": [
                alert("2m", "ClaudePMAgentRestartStorm"),  # four so far
                alert(
                    "3m",
                    "ClaudePMAgentRestartStorm",
                    (
                        {
                            "severity": "warning",
                            "job": "claude-pm",
                            "instance": H1,
                            "agent_type": "eng",
                        },
                        {
                            "summary": "6 restarts of eng agents on h1:9464 in the last 15 minutes",
                            "description": "Runs of these agents keep ending and their restart "
                            "policy starts them again. `claude-pm events` on that host tells why "
                            "each run ended, `claude-pm stats` each agent's restarts; fix the "
                            'cause, raise their limits, or set restart = "no".',
                        },
                    ),
                ),
                alert("19m", "ClaudePMAgentRestartStorm"),  # the restarts are 15 minutes old
                alert("3m", "ClaudePMAgentRestartLimit"),
                alert(
                    "4m",
                    "ClaudePMAgentRestartLimit",
                    (
                        {
                            "severity": "critical",
                            "job": "claude-pm",
                            "instance": H1,
                            "agent_type": "eng",
                        },
                        {
                            "summary": "1 eng agent(s) on h1:9464 reached their restart limit "
                            "in the last hour",
                            "description": "Their runs ended more than restart_limit times "
                            "within restart_window_s, so they are not restarted again. "
                            "`claude-pm events` on that host names them and why their last run "
                            "ended; launch them again once the cause is fixed.",
                        },
                    ),
                ),
            ],
        },
        {
            # The host's budget and queue: h1 fills its budget, queues and sheds; h2 is calm.
            "interval": "1m",
            "input_series": [
                series("claude_pm_host_budget_bytes", "1000x20", instance=H1),
                series("claude_pm_host_agents_used_bytes", "500 950x19", instance=H1),
                series("claude_pm_host_budget_bytes", "1000x20", instance=H2),
                series("claude_pm_host_agents_used_bytes", "850x20", instance=H2),
                series("claude_pm_queue_length", "0 2x11 5x8", instance=H1),
                series("claude_pm_queue_capacity", "5x20", instance=H1),
                series("claude_pm_queue_length", "0 1 0 1 0 1 0 1 0 1 0 1 0 1", instance=H2),
                series("claude_pm_queue_capacity", "5x20", instance=H2),
                series("claude_pm_sheds_total", "0 0 2 2 2x17", instance=H1, trigger="budget"),
                series("claude_pm_sheds_total", "0x20", instance=H1, trigger="psi"),
            ],
            "alert_rule_test": [
                alert("5m", "ClaudePMHostBudgetNearlyFull"),  # 95% for 4 minutes so far
                alert(
                    "6m",
                    "ClaudePMHostBudgetNearlyFull",
                    (
                        {"severity": "warning", "job": "claude-pm", "instance": H1},
                        {
                            "summary": "Agents on h1:9464 use 95% of the host's memory budget",
                            "description": "Over 100% the daemon sheds the lowest-priority "
                            "agent. `claude-pm status` and `claude-pm queue` on that host show "
                            "the budget, its use and what waits; raise [host] budget_mb if the "
                            "host has room, or send fewer agents there.",
                        },
                    ),
                ),
                alert("10m", "ClaudePMLaunchesQueued"),  # waiting for 9 minutes
                alert(
                    "11m",
                    "ClaudePMLaunchesQueued",
                    (
                        {"severity": "warning", "job": "claude-pm", "instance": H1},
                        {
                            "summary": "The admission queue on h1:9464 has not been empty for "
                            "10 minutes (2 waiting)",
                            "description": "Launches wait until the agents' memory budget has "
                            "room for their request_mb. `claude-pm queue` on that host tells why "
                            "each waits; lower their request_mb, raise [host] budget_mb, or move "
                            "work to other hosts.",
                        },
                    ),
                ),
                alert("13m", "ClaudePMQueueFull"),  # just filled
                alert(
                    "14m",
                    "ClaudePMQueueFull",
                    (
                        {"severity": "warning", "job": "claude-pm", "instance": H1},
                        {
                            "summary": "The admission queue on h1:9464 is full (5 waiting)",
                            "description": "New launches there are refused with queue_full "
                            "until some are admitted or cancelled (`claude-pm queue`, "
                            "`claude-pm cancel`; [host] max_queued).",
                        },
                    ),
                ),
                alert(
                    "5m",
                    "ClaudePMAgentsShed",
                    (
                        {
                            "severity": "warning",
                            "job": "claude-pm",
                            "instance": H1,
                            "trigger": "budget",
                        },
                        {
                            "summary": "2 agent(s) shed on h1:9464 in the last 15 minutes (budget)",
                            "description": "The daemon stopped agents to keep the host within "
                            "its memory budget (trigger budget: the agents over [host] "
                            "budget_mb; reserve: available memory under [host] reserve_mb; psi: "
                            "memory stalls over [host] pressure_psi_some_avg10). `claude-pm "
                            'events` there names them; those with on_pressure = "requeue" run '
                            "again once there is room.",
                        },
                    ),
                ),
                alert("19m", "ClaudePMAgentsShed"),  # the sheds are over 15 minutes old
            ],
        },
    ],
}


@needs_prometheus
def test_rules_file_passes_promtool_and_its_alerts_fire(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tests = tmp_path / "rules-test.yml"
    # JSON is YAML: the test file is written from the dict above.
    tests.write_text(json.dumps({"rule_files": [str(RULES)], **RULES_TESTS}, indent=1))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    # Rows (panel type "row") only group the panels below them: no queries of their own.
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    return exprs


def test_dashboard_uses_only_metrics_the_daemon_serves() -> None:
    text = busy_metrics(guide_names=False).render().decode()
    served = {family.name for family in text_string_to_metric_families(text)}
    served |= {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    used = set()
    for expr in dashboard_queries():
        used |= set(re.findall(r"\b(?:claude_pm|process)_[a-z_]+\b", expr))
    assert used, "the dashboard has queries"
    assert used <= served, used - served


def test_dashboard_panels_are_consistent() -> None:
    """Unique ids, no two panels on the same cells, every query on the chosen data source."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert not mine & cells, panel["title"]
        cells |= mine
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


# -- a real Prometheus -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def metrics_port(home: Home, timeout_s: float = 10.0) -> int:
    """The port the daemon bound for ``listen = "127.0.0.1:0"``, from its own log."""
    with anyio.fail_after(timeout_s):
        while True:
            if home.daemon_log.exists():
                for line in home.daemon_log.read_text().splitlines():
                    record = json.loads(line)
                    if record.get("event") == "metrics_listening":
                        return int(record["port"])
            await anyio.sleep(0.05)


class Prometheus:
    """Debian's prometheus on a loopback port, scraping one target every second."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: claude-pm\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, http: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
        with anyio.fail_after(timeout_s):
            while True:
                assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
                try:
                    if (await http.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)

    async def query(self, http: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
        response = await http.get(f"{self.url}/api/v1/query", params={"query": promql})
        body = response.json()
        assert body["status"] == "success", (promql, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def wait_for(
        self, http: httpx.AsyncClient, promql: str, timeout_s: float = 15.0, empty: bool = False
    ) -> list[dict[str, Any]]:
        with anyio.fail_after(timeout_s):
            while True:
                result = await self.query(http, promql)
                if bool(result) != empty:
                    return result
                await anyio.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@needs_prometheus
async def test_prometheus_scrapes_the_daemon(home: Home, short_tmp: Path) -> None:
    write_config(home, metrics={"listen": "127.0.0.1:0"})
    daemon = DaemonProcess(home).start()
    prometheus: Prometheus | None = None
    try:
        port = await metrics_port(home)
        prometheus = Prometheus(short_tmp, port)
        async with (
            httpx.AsyncClient(timeout=10) as http,
            daemon.async_client() as client,
            daemon.async_client() as sub,
        ):
            events = await Events(sub).start()
            await prometheus.wait_ready(http)
            steady = (await client.launch("steady", simagent("--hold-mb", "40")))["subprocess_id"]
            selector = f'{{subprocess_id="{steady}"}}'
            (series,) = await prometheus.wait_for(http, f"claude_pm_subprocess_memory_mb{selector}")
            assert series["metric"]["agent_type"] == "steady"
            assert series["metric"]["job"] == "claude-pm"
            current = (await client.stats(steady))["current_mb"]
            assert float(series["value"][1]) == pytest.approx(current, abs=15)
            (bytes_series,) = await prometheus.wait_for(
                http, f"claude_pm_subprocess_memory_bytes{selector}"
            )
            assert float(bytes_series["value"][1]) == pytest.approx(current * MIB, rel=0.5)
            (up,) = await prometheus.query(http, 'up{job="claude-pm"}')
            assert up["value"][1] == "1"
            (scan,) = await prometheus.query(http, "claude_pm_sample_duration_seconds")
            assert 0 < float(scan["value"][1]) < 1.0
            # The budget the daemon resolved from the host (no [host] budget_mb given).
            (budget,) = await prometheus.query(http, "claude_pm_host_budget_bytes")
            host = (await client.status())["host"]
            assert float(budget["value"][1]) == host["budget_mb"] * MIB

            # A hog killed at max_mb: the kill is counted, and its series end with it.
            hog = (
                await client.launch(
                    "hog", simagent("--hold-mb", "10", "--rate", "150", "--cap", "280")
                )
            )["subprocess_id"]
            term = await events.next_matching(
                20, type="alert", subprocess_id=hog, event="sigterm_sent"
            )
            record = await events.exit_of(hog)
            assert record["reason"] == "memory_limit"
            (kills,) = await prometheus.wait_for(
                http, 'claude_pm_kills_total{reason="memory_limit"} > 0'
            )
            assert kills["value"][1] == "1"
            await prometheus.wait_for(
                http, f'claude_pm_subprocess_memory_bytes{{subprocess_id="{hog}"}}', empty=True
            )
            exposition = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert hog not in exposition
            assert steady in exposition
            # The kill's latencies, as the supervisor measured them, reach the histogram.
            for phase, seconds in (
                ("crossed_to_term", term["crossed_to_term_s"]),
                ("term_to_gone", record["term_to_gone_s"]),
            ):
                hist = "claude_pm_escalation_latency_seconds"
                (total,) = await prometheus.wait_for(http, f'{hist}_sum{{phase="{phase}"}} > 0')
                assert float(total["value"][1]) == pytest.approx(seconds, abs=1e-6)
                (count,) = await prometheus.query(http, f'{hist}_count{{phase="{phase}"}}')
                assert count["value"][1] == "1"

            # The rules file loads into a real Prometheus, and every dashboard query parses.
            rules = (await http.get(f"{prometheus.url}/api/v1/rules")).json()["data"]["groups"]
            assert {r["name"] for g in rules for r in g["rules"]} >= {
                "ClaudePMAgentNearLimit",
                "ClaudePMAgentsKilled",
                "ClaudePMDaemonDown",
                "ClaudePMHostBudgetNearlyFull",
                "ClaudePMLaunchesQueued",
                "ClaudePMQueueFull",
                "ClaudePMAgentsShed",
            }
            assert all(r["health"] != "err" for g in rules for r in g["rules"])
            for expr in dashboard_queries():
                grafana = {"$instance": ".*", "$agent_type": ".*", "$__rate_interval": "1m"}
                for variable, replacement in grafana.items():
                    expr = expr.replace(variable, replacement)
                await prometheus.query(http, expr)

            # promtool on what the daemon serves with an agent running.
            result = promtool("check", "metrics", stdin=exposition.encode())
            problems = [p for p in (result.stdout + result.stderr).splitlines() if p.strip()]
            assert {p.split()[0] for p in problems} <= set(GUIDE_LINT), problems
            assert result.returncode in (0, 3), problems
    finally:
        if prometheus is not None:
            prometheus.stop()
        daemon.close()


async def test_the_daemon_serves_its_budget_and_queue(home: Home) -> None:
    """A real daemon with a 600 MB budget: one 500 MB launch runs, the next waits; the
    scrape shows the budget, the request, the queue and its events as they happen."""
    limits = {"warning_mb": 500, "critical_mb": 600, "max_mb": 700}
    write_config(home, limits, metrics={"listen": "127.0.0.1:0"}, host={"budget_mb": 600})
    daemon = DaemonProcess(home).start()
    sleeper = ["/bin/sh", "-c", "exec sleep 30"]
    try:
        url = f"http://127.0.0.1:{await metrics_port(home)}/metrics"
        async with httpx.AsyncClient(timeout=10) as http, daemon.async_client() as client:
            first = (await client.launch("big", sleeper, request_mb=500))["subprocess_id"]
            waiting = await client.launch("big", sleeper, request_mb=500)
            assert waiting["queued"]
            text = (await http.get(url)).text
            host = (await client.status())["host"]
            assert value(text, "claude_pm_host_budget_bytes") == 600 * MIB
            assert value(text, "claude_pm_host_reserve_bytes") == host["reserve_mb"] * MIB
            assert value(text, "claude_pm_host_agents_requested_bytes") == 500 * MIB
            assert value(text, "claude_pm_host_agents_held_bytes") == 500 * MIB
            used = value(text, "claude_pm_host_agents_used_bytes")
            assert used is not None
            assert 0 <= used < 50 * MIB  # a shell's sleep
            assert value(text, "claude_pm_queue_length") == 1
            assert value(text, "claude_pm_queue_capacity") == host["max_queued"]
            assert value(text, "claude_pm_queue_events_total", event="queued") == 1
            labels = {"subprocess_id": first, "agent_type": "big"}
            assert value(text, "claude_pm_subprocess_request_bytes", **labels) == 500 * MIB

            await client.cancel(waiting["subprocess_id"])
            with anyio.fail_after(5):  # the counter follows the bus; the gauge is read now
                while True:
                    text = (await http.get(url)).text
                    if value(text, "claude_pm_queue_events_total", event="cancelled") == 1:
                        break
                    await anyio.sleep(0.05)
            assert value(text, "claude_pm_queue_length") == 0
            assert value(text, "claude_pm_queue_events_total", event="admitted") == 0
            assert value(text, "claude_pm_sheds_total", trigger="budget") == 0
            await client.kill(first)
    finally:
        daemon.close()


def test_timing_fields_are_optional_and_every_alert_and_kill_series_starts_at_zero() -> None:
    """Events without timing figures leave the histogram empty; every alert kind, kill
    reason, shed trigger and queue event exists from the start, so increase() sees its first
    step from 0."""
    metrics = Metrics()
    text = metrics.render().decode()
    for kind in AlertKind:
        assert value(text, "claude_pm_alerts_total", event=kind.value, level=kind.level.name) == 0
    kills = {r.value for r in EndReason if r.aborted}
    assert kills == {"memory_limit", "timeout", "oom_killed", "host_pressure"}
    for reason in kills:
        assert value(text, "claude_pm_kills_total", reason=reason) == 0
    for trigger in Trigger:
        assert value(text, "claude_pm_sheds_total", trigger=trigger.value) == 0
    for event in ("queued", "admitted", "cancelled"):
        assert value(text, "claude_pm_queue_events_total", event=event) == 0
    metrics.observe(ev.alert("sigterm_sent"))
    metrics.observe(ev.exit_("a_aaaaaaaaaaaa", "memory_limit"))
    text = metrics.render().decode()
    assert value(text, "claude_pm_escalation_latency_seconds_count", phase="term_to_gone") is None
    assert (
        value(text, "claude_pm_escalation_latency_seconds_count", phase="crossed_to_term") is None
    )
    assert value(text, "claude_pm_kills_total", reason="memory_limit") == 1
    assert value(text, "claude_pm_alerts_total", event="oom_kill", level="CRITICAL") == 0
