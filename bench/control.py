"""Control channel: request latency with 500 agents, and requests per second from 50 clients.

``status`` and ``stats`` (all agents) are sent one after another on one connection with the
blocking client, while the daemon keeps sampling its 500 idle trees, so the tail includes
requests that meet a sampling tick. Throughput is ``ping`` from 50 concurrent ``AsyncClient``
connections in one process. The baseline is ``bench.echo_server``, a trivial anyio JSON-lines
server that answers ``status`` and ``stats`` with the daemon's own documents captured here:
the same bytes, without the work of producing them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from bench.common import (
    PYTHON,
    BenchResult,
    Daemon,
    Figure,
    Target,
    clean_env,
    log,
    percentile,
    stop_process,
)
from bench.idle_tree import COMMAND, REQUEST_MB, wait_complete
from bench.overhead import MEMORY
from supervisord.control.client import AsyncClient, Client

STATUS_P99_TARGET_MS = 10.0
RPS_TARGET = 2000.0
BASELINE = "anyio echo server"


@dataclass(frozen=True, slots=True)
class Plan:
    agents: int
    requests: int  # per command, for the latency figures
    clients: int
    rps_window_s: float


FULL = Plan(agents=500, requests=200, clients=50, rps_window_s=5.0)
QUICK = Plan(agents=20, requests=30, clients=10, rps_window_s=1.0)


def run(quick: bool = False) -> BenchResult:
    plan = QUICK if quick else FULL
    result = BenchResult("control")
    result.details = {"plan": _plan_dict(plan)}
    with Daemon(MEMORY, "ct") as daemon, daemon.client() as client:
        for _ in range(plan.agents):
            daemon.launch(client, "idle", COMMAND, request_mb=REQUEST_MB)
        wait_complete(client, plan.agents)
        canned = {"status": client.status(), "stats": client.stats()}
        canned_file = daemon.dir / "canned.json"
        canned_file.write_text(json.dumps(canned))
        result.details["response_bytes"] = {
            cmd: len(json.dumps({"id": 1, "ok": True, "result": doc}))
            for cmd, doc in canned.items()
        }
        log(f"control: latency and throughput of the daemon with {plan.agents} agents")
        ours = _measure(daemon.socket, plan)
        echo_socket = daemon.dir / "echo.sock"
        echo_command = [PYTHON, "-m", "bench.echo_server", "--socket", str(echo_socket)]
        echo = subprocess.Popen(
            [*echo_command, "--canned", str(canned_file)],
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        try:
            assert echo.stdout is not None
            if echo.stdout.readline().strip() != b"ready":
                raise RuntimeError("the echo server did not start")
            log("control: the same against the echo server")
            floor = _measure(echo_socket, plan)
        finally:
            stop_process(echo, 10)
            if echo.stdout is not None:
                echo.stdout.close()
    result.details["daemon"], result.details["baseline"] = ours, floor
    n = plan.agents
    result.figures = [
        _latency("status", "p50", n, ours, floor),
        _latency("status", "p99", n, ours, floor, Target("<", STATUS_P99_TARGET_MS)),
        _latency("stats", "p50", n, ours, floor),
        _latency("stats", "p99", n, ours, floor),
        _latency("ping", "p50", n, ours, floor),
        Figure(
            key="control.ping_rps",
            label=f"ping throughput, {plan.clients} concurrent clients",
            unit="req/s",
            value=round(ours["ping_rps"]),
            baseline=round(floor["ping_rps"]),
            baseline_label=BASELINE,
            target=Target(">", RPS_TARGET),
        ),
    ]
    for whom, measured in (("the daemon", ours), ("the echo server", floor)):
        client_cpu = measured["load_generator_cpu_pct"]
        if client_cpu > 90:
            result.notes.append(
                f"against {whom} the load generator (one process, {plan.clients} AsyncClients) "
                f"used {client_cpu:.0f}% of a core: that throughput is bounded by the client, "
                "a lower bound of what the server can do"
            )
    return result


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {
        "agents": plan.agents,
        "requests": plan.requests,
        "clients": plan.clients,
        "rps_window_s": plan.rps_window_s,
    }


def _latency(
    cmd: str,
    which: str,
    agents: int,
    ours: dict[str, Any],
    floor: dict[str, Any],
    target: Target | None = None,
) -> Figure:
    what = {"status": "status", "stats": "stats (all agents)", "ping": "ping"}[cmd]
    return Figure(
        key=f"control.{cmd}_{which}_ms",
        label=f"{what} latency {which}, {agents} agents",
        unit="ms",
        value=round(ours[f"{cmd}_ms"][which], 3),
        baseline=round(floor[f"{cmd}_ms"][which], 3),
        baseline_label=BASELINE,
        target=target,
    )


def _measure(socket_path: Path, plan: Plan) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with Client(socket_path, timeout_s=60) as client:
        calls: dict[str, Callable[[], Any]] = {
            "ping": client.ping,
            "status": client.status,
            "stats": client.stats,
        }
        for cmd, call in calls.items():
            for _ in range(3):
                call()  # Warm-up: connection, caches, first-call costs.
            times = []
            for _ in range(plan.requests):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1000)
            figures[f"{cmd}_ms"] = {
                "p50": percentile(times, 50),
                "p99": percentile(times, 99),
                "max": max(times),
                "n": len(times),
            }
    rps, cpu = anyio.run(_throughput, socket_path, plan.clients, plan.rps_window_s)
    figures["ping_rps"], figures["load_generator_cpu_pct"] = rps, cpu
    return figures


async def _throughput(socket_path: Path, clients: int, window_s: float) -> tuple[float, float]:
    """Each client pings in a loop for the window; the total answered per second."""
    count = 0
    async with AsyncExitStack() as stack:
        connected = [
            await stack.enter_async_context(AsyncClient(socket_path)) for _ in range(clients)
        ]
        for c in connected:
            await c.ping()
        deadline = anyio.current_time() + window_s

        async def pinger(c: AsyncClient) -> None:
            nonlocal count
            while anyio.current_time() < deadline:
                await c.ping()
                count += 1

        cpu0, t0 = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for c in connected:
                tg.start_soon(pinger, c)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return count / elapsed, 100.0 * cpu / elapsed
