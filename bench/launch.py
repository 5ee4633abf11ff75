"""Launch throughput: idle trees launched through the daemon, one request after another,
until 200 run; the baseline is ``subprocess.Popen`` of the same command in a loop (in its
own session, as the daemon starts agents), which is the fork/exec floor under any launcher.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import BenchResult, Daemon, Figure, log, percentile, wait_until
from bench.idle_tree import COMMAND, REQUEST_MB, kill_trees, popen_tree
from bench.overhead import MEMORY

BASELINE = "Popen loop"


def run(quick: bool = False) -> BenchResult:
    count = 20 if quick else 200
    result = BenchResult("launch")
    with Daemon(MEMORY, "la") as daemon, daemon.client() as client:
        latencies = []
        t0 = time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            daemon.launch(client, "idle", COMMAND, request_mb=REQUEST_MB)
            latencies.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - t0
        # Launch answers once the agent is spawned; the daemon must also count them all.
        wait_until(lambda: client.status()["agent_count"] >= count, 30, f"{count} agents")
    ours = _summary(count, elapsed, latencies)
    log(f"launch: daemon {ours['per_s']:.0f}/s; now the Popen loop")
    procs = []
    latencies = []
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            procs.append(popen_tree())
            latencies.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - t0
    finally:
        kill_trees(procs)
    floor = _summary(count, elapsed, latencies)
    result.details = {"count": count, "daemon": ours, "baseline": floor}
    result.figures = [
        Figure(
            key="launch.per_s",
            label=f"launches per second, until {count} run",
            unit="/s",
            value=round(ours["per_s"], 1),
            baseline=round(floor["per_s"], 1),
            baseline_label=BASELINE,
        ),
        Figure(
            key="launch.p50_ms",
            label="launch latency p50",
            unit="ms",
            value=round(ours["p50_ms"], 2),
            baseline=round(floor["p50_ms"], 2),
            baseline_label=BASELINE,
        ),
        Figure(
            key="launch.p99_ms",
            label="launch latency p99",
            unit="ms",
            value=round(ours["p99_ms"], 2),
            baseline=round(floor["p99_ms"], 2),
            baseline_label=BASELINE,
        ),
    ]
    return result


def _summary(count: int, elapsed: float, latencies: list[float]) -> dict[str, Any]:
    return {
        "per_s": count / elapsed,
        "elapsed_s": elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
    }
