"""Overhead: the daemon's CPU and memory while it supervises 10, 100 and 500 idle trees.

The trees (3 processes each) are launched through the daemon, which samples them at its
default 2 s interval. After a warm-up its CPU (utime+stime, % of one core) is measured over
a window, then its RSS. The baseline is the naive psutil loop (``bench.naive_sampler``) over
the same trees at the same interval, in a process of its own, measured the same way.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench import peer, peer_fleet
from bench.common import (
    PYTHON,
    BenchResult,
    Daemon,
    Figure,
    Target,
    Usage,
    clean_env,
    log,
    measure_usage,
    stop_process,
)
from bench.idle_tree import COMMAND, PROCESSES_PER_TREE, REQUEST_MB, wait_complete

# Tiny thresholds: the launch check refuses an agent when available memory is below its
# warning_mb, and idle trees of ~3 MB never come near any of them.
MEMORY = {
    "warning_mb": 64,
    "critical_mb": 128,
    "max_mb": 256,
    "check_interval_s": 2.0,
    "term_grace_s": 2.0,
}
SIZES = (10, 100, 500)
QUICK_SIZES = (5,)
CPU_TARGET_PCT = 2.0
RSS_TARGET_MB = 80.0
BASELINE = "psutil loop"
OFF = {"cgroup": {"mode": "off"}}


def run(quick: bool = False) -> BenchResult:
    sizes = QUICK_SIZES if quick else SIZES
    window_s, warmup_s = (3.0, 1.0) if quick else (20.0, 4.0)
    result = BenchResult("overhead")
    result.details = {"window_s": window_s, "warmup_s": warmup_s, "interval_s": 2.0, "sizes": {}}
    with Daemon(MEMORY, "ov") as daemon, daemon.client() as client:
        pids: list[int] = []
        for size in sizes:
            t0 = time.monotonic()
            while len(pids) < size:
                pids.append(
                    int(daemon.launch(client, "idle", COMMAND, request_mb=REQUEST_MB)["pid"])
                )
            log(f"overhead: {size} trees launched in {time.monotonic() - t0:.1f} s")
            wait_complete(client, size)
            time.sleep(warmup_s)
            log(f"overhead: measuring the daemon over {window_s:g} s")
            ours = measure_usage(daemon.pid, window_s)
            log(f"overhead: measuring the psutil loop over {window_s:g} s")
            # Two seconds let the loop import psutil and find its roots before measuring.
            naive, ticks = _measure_naive(pids, daemon.dir, window_s, min(warmup_s, 2.0))
            result.details["sizes"][str(size)] = {
                "daemon": ours.as_dict(),
                "baseline": naive.as_dict(),
                "baseline_ticks_s": [round(t, 3) for t in ticks],
                "processes_supervised": size * PROCESSES_PER_TREE,
            }
            result.figures += _figures(size, ours, naive, last=size == sizes[-1])
            if ticks and max(ticks) > 2.0:
                result.notes.append(
                    f"{size} trees: one tick of the psutil loop takes {max(ticks):.1f} s, "
                    "so it cannot keep a 2 s interval (it runs back to back, saturated)"
                )
            elif not ticks:
                result.notes.append(
                    f"{size} trees: the psutil loop did not finish one tick in {window_s:g} s"
                )
    top = sizes[-1]
    result.figures += _backstop_off(top, window_s, warmup_s, result)
    result.figures += _peer(top, window_s, warmup_s, quick, result)
    return result


def _backstop_off(size: int, window_s: float, warmup_s: float, result: BenchResult) -> list[Figure]:
    """The same trees under a daemon whose kernel backstop is off: every tree is then found
    by a /proc scan each interval, so this is the daemon's cost without cgroups."""
    with Daemon(MEMORY, "ovoff", OFF) as daemon, daemon.client() as client:
        for _ in range(size):
            daemon.launch(client, "idle", COMMAND, request_mb=REQUEST_MB)
        wait_complete(client, size)
        assert client.status()["cgroups"]["in_force"] == "off"
        time.sleep(warmup_s)
        log(f"overhead: measuring the daemon with the cgroup backstop off over {window_s:g} s")
        usage = measure_usage(daemon.pid, window_s)
    result.details["backstop_off"] = {str(size): usage.as_dict()}
    naive = result.details["sizes"][str(size)]["baseline"]
    return [
        Figure(
            key=f"overhead.cpu_pct.{size}.backstop_off",
            label=f"CPU, {size} idle trees, cgroup backstop off",
            unit="% core",
            value=round(usage.cpu_pct, 3),
            baseline=naive["cpu_pct"],
            baseline_label=BASELINE,
            target=Target("<", CPU_TARGET_PCT),
        ),
        Figure(
            key=f"overhead.rss_mb.{size}.backstop_off",
            label=f"RSS, {size} idle trees, cgroup backstop off",
            unit="MB",
            value=round(usage.rss_mb, 1),
            baseline=naive["rss_mb"],
            baseline_label=BASELINE,
            target=Target("<", RSS_TARGET_MB),
        ),
    ]


def _peer(
    size: int, window_s: float, warmup_s: float, quick: bool, result: BenchResult
) -> list[Figure]:
    """supervisord + memmon's own cost for as many idle programs: a peer that does the job."""
    if quick:
        return []  # pip-installing the peer is not for a smoke run
    why_not = peer.ensure_installed()
    if why_not is not None:
        result.notes.append(f"no supervisord + memmon baseline: {why_not}")
        return []
    log(f"overhead: supervisord + memmon with {size} idle programs")
    fleet = peer_fleet.measure(size, window_s, max(warmup_s, 6.0))
    result.details["peer_fleet"] = fleet.as_dict()
    result.notes.append(
        f"supervisord + memmon (-c -a, TICK_5): {size} programs started in "
        f"{fleet.started_s:.0f} s; CPU and RSS are supervisord's and memmon's together"
    )
    ours = result.details["sizes"][str(size)]["daemon"]
    peer_label = "supervisord + memmon -c"
    return [
        Figure(
            key=f"overhead.peer_cpu_pct.{size}",
            label=f"CPU, {size} idle trees, beside supervisord + memmon",
            unit="% core",
            value=ours["cpu_pct"],
            baseline=round(fleet.cpu_pct, 3),
            baseline_label=peer_label,
        ),
        Figure(
            key=f"overhead.peer_rss_mb.{size}",
            label=f"RSS, {size} idle trees, beside supervisord + memmon",
            unit="MB",
            value=ours["rss_mb"],
            baseline=round(fleet.rss_mb, 1),
            baseline_label=peer_label,
        ),
    ]


def _figures(size: int, ours: Usage, naive: Usage, *, last: bool) -> list[Figure]:
    # The targets are stated for 500 trees; a --quick run shows them on its largest size.
    at_target = size == 500 or last
    return [
        Figure(
            key=f"overhead.cpu_pct.{size}",
            label=f"CPU, {size} idle trees, 2 s interval",
            unit="% core",
            value=round(ours.cpu_pct, 3),
            baseline=round(naive.cpu_pct, 3),
            baseline_label=BASELINE,
            target=Target("<", CPU_TARGET_PCT) if at_target else None,
        ),
        Figure(
            key=f"overhead.rss_mb.{size}",
            label=f"RSS, {size} idle trees",
            unit="MB",
            value=round(ours.rss_mb, 1),
            baseline=round(naive.rss_mb, 1),
            baseline_label=BASELINE,
            target=Target("<", RSS_TARGET_MB) if at_target else None,
        ),
    ]


def _measure_naive(
    pids: list[int], workdir: Path, window_s: float, warmup_s: float
) -> tuple[Usage, list[float]]:
    pids_file, ticks_file = workdir / "naive.pids", workdir / f"naive-{len(pids)}.ticks"
    pids_file.write_text("\n".join(map(str, pids)) + "\n")
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "bench.naive_sampler",
            "--interval",
            "2",
            "--pids-file",
            str(pids_file),
            "--ticks-file",
            str(ticks_file),
        ],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )
    try:
        time.sleep(warmup_s)
        usage = measure_usage(proc.pid, window_s)
    finally:
        stop_process(proc, 10)
    ticks = []
    if ticks_file.exists():
        ticks = [float(line.split()[0]) for line in ticks_file.read_text().splitlines() if line]
    return usage, ticks
