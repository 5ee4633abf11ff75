"""Restart latency: an agent that fails at once, restarted by its policy with no delay, from
the record of one run to the start of the next; the baseline is a loop that waits for the
same command and starts it again (``subprocess.Popen``, its own session), the floor under
any supervisor's restart. The daemon's figure includes what it does between runs: the stats
record, the restart decision, removing the run's memory cgroup and creating the next one.
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from typing import Any

from bench.common import BenchResult, Daemon, Figure, log, percentile
from bench.overhead import MEMORY

BASELINE = "wait + Popen loop"
COMMAND = ["/bin/sh", "-c", "exit 1"]


def run(quick: bool = False) -> BenchResult:
    restarts = 10 if quick else 100
    result = BenchResult("restart")
    ours = _daemon(restarts)
    log(f"restart: daemon p50 {ours['p50_ms']:.1f} ms; now the Popen loop")
    floor = _loop(restarts)
    result.details = {"restarts": restarts, "daemon": ours, "baseline": floor}
    result.figures = [
        Figure(
            key=f"restart.{name}_ms",
            label=f"run ended to next run started, {name}, delay 0",
            unit="ms",
            value=round(ours[f"{name}_ms"], 2),
            baseline=round(floor[f"{name}_ms"], 2),
            baseline_label=BASELINE,
        )
        for name in ("p50", "p99")
    ]
    return result


def _daemon(restarts: int) -> dict[str, Any]:
    policy = {
        "restart": "on-failure",
        "restart_delay_s": 0,
        "restart_backoff": 1,
        "restart_jitter": 0,
        "restart_limit": restarts + 1,
        "restart_window_s": 3600,
    }
    with Daemon(MEMORY, "rs") as daemon, daemon.client() as watcher, daemon.client() as client:
        events = watcher.subscribe(types=["exit", "restarted", "restart_limit"])
        started = time.perf_counter()
        sid = client.launch("flaky", COMMAND, restart=policy)["subprocess_id"]
        ended: dict[int, float] = {}
        gaps: list[float] = []
        for event in events:
            if event["subprocess_id"] != sid:
                continue
            if event["type"] == "exit":
                ended[event["run"]] = _instant(event)
            elif event["type"] == "restarted":
                gaps.append((_instant(event) - ended[event["run"] - 1]) * 1000)
            else:
                break
        elapsed = time.perf_counter() - started
    return _summary(gaps, elapsed)


def _loop(restarts: int) -> dict[str, Any]:
    gaps: list[float] = []
    started = time.perf_counter()
    proc = subprocess.Popen(COMMAND, start_new_session=True)
    for _ in range(restarts):
        proc.wait()
        gone = time.perf_counter()
        proc = subprocess.Popen(COMMAND, start_new_session=True)
        gaps.append((time.perf_counter() - gone) * 1000)
    proc.wait()
    return _summary(gaps, time.perf_counter() - started)


def _instant(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"].rstrip("Z")).timestamp()


def _summary(gaps: list[float], elapsed: float) -> dict[str, Any]:
    return {
        "p50_ms": percentile(gaps, 50),
        "p99_ms": percentile(gaps, 99),
        "max_ms": max(gaps),
        "runs_per_s": (len(gaps) + 1) / elapsed,
    }
