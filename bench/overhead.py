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
from bench.idle_tree import COMMAND, PROCESSES_PER_TREE, wait_complete

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
                pids.append(int(daemon.launch(client, "idle", COMMAND)["pid"]))
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
    return result


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
