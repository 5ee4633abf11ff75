"""The benchmark suite still runs: ``python -m bench --quick`` end to end, in under a minute.

It starts real daemons, idle trees, a leaker (256 MB limit, capped at 768 MB), supervisord
with memmon (installed into the venv by the bench when missing), the echo server and a small
fleet (4 agents against a 600 MB budget, and the same without one), so a change that breaks
the bench or the daemon interfaces it drives fails here, not at the next ``make bench``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import clean_env
from bench.fleet import FleetObserver

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {
    "overhead": {
        "overhead.cpu_pct.5",
        "overhead.rss_mb.5",
        "overhead.cpu_pct.5.backstop_off",
        "overhead.rss_mb.5.backstop_off",
    },
    "leak": {
        f"leak.{figure}.{shape}.500"
        for figure in ("overshoot_mb", "sigterm_ms", "gone_ms")
        for shape in ("process", "tree")
    },
    "control": {
        "control.status_p50_ms",
        "control.status_p99_ms",
        "control.stats_p50_ms",
        "control.stats_p99_ms",
        "control.ping_p50_ms",
        "control.ping_rps",
    },
    "launch": {"launch.per_s", "launch.p50_ms", "launch.p99_ms"},
    "restart": {"restart.p50_ms", "restart.p99_ms"},
    "orchestrate": {
        "orchestrate.mcp_list_agents_p50_ms",
        "orchestrate.mcp_list_agents_p99_ms",
        "orchestrate.tab_command_ms",
        "orchestrate.tab_ids_ms",
    },
    "fleet": {
        f"fleet.{figure}"
        for figure in (
            "peak_total_mb",
            "peak_ratio",
            "oom_kills",
            "completed",
            "shed",
            "limit_kills",
            "makespan_s",
            "makespan_ratio",
        )
    },
}
FIGURE_KEYS = {"key", "label", "unit", "value", "baseline", "baseline_label", "target", "verdict"}


@pytest.mark.timeout(240)
def test_quick_bench_writes_every_figure_and_baseline(short_tmp: Path) -> None:
    out = short_tmp / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["quick"] is True
    assert {"cores", "memory_total_mb", "kernel", "python"} <= set(data["machine"])
    assert set(data["benchmarks"]) == set(EXPECTED)
    for name, keys in EXPECTED.items():
        bench = data["benchmarks"][name]
        assert bench["error"] is None, bench["error"]
        figures = {f["key"]: f for f in bench["figures"]}
        assert set(figures) == keys
        for figure in figures.values():
            assert set(figure) >= FIGURE_KEYS, figure
            assert isinstance(figure["value"], int | float), figure
            # A baseline may be missing only when the run says why (memmon not installable).
            assert isinstance(figure["baseline"], int | float) or bench["notes"], figure
    # The table went to stdout, with each figure's row.
    assert "| bench" in done.stdout
    assert "ping throughput" in done.stdout
    assert "fleet peak total" in done.stdout
    # The fleet ran twice, to the end, and the observer saw every agent of both runs.
    runs = data["benchmarks"]["fleet"]["details"]["runs"]
    assert set(runs) == {"limits only", "budget"}
    for run in runs.values():
        assert run["finished"], run["problems"]
        assert run["observer"]["agents_seen"] == run["agents"], run["observer"]
    assert runs["budget"]["queued"] >= 1, runs["budget"]["timeline"]


@pytest.mark.timeout(60)
def test_fleet_observer_counts_only_the_agents_of_its_home(short_tmp: Path) -> None:
    """The fleet's observer sums the RSS of processes carrying the agent marker and its
    daemon's home, and of no other: not another home's agent, not an unmarked process."""
    home = short_tmp / "home"

    def agent(mb: int, **env: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "supervisord.simagent", "--hold-mb", str(mb)]
        return subprocess.Popen([*command, "--duration", "3"], env=clean_env(**env), cwd=REPO)

    observer = FleetObserver(home, kill_above_mb=2000, timeout_s=30)
    procs = []
    try:
        procs = [
            agent(120, CLAUDE_PM_HOME=str(home), CLAUDE_PM_SUBPROCESS_ID="ours_1"),
            agent(80, CLAUDE_PM_HOME=str(short_tmp / "other"), CLAUDE_PM_SUBPROCESS_ID="x_1"),
            agent(80, CLAUDE_PM_HOME=str(home)),
        ]
        for proc in procs:
            proc.wait(20)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        seen = observer.stop()
    assert set(seen["per_agent_peak_mb"]) == {"ours_1"}, seen["per_agent_peak_mb"]
    assert 120 <= seen["peak_total_mb"] < 200, seen
    assert seen["samples"] > 10
    assert seen["killed_by_observer"] is None
