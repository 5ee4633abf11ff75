"""The overhead's peer baseline: supervisord + superlance memmon watching N idle programs.

One supervisord (``-n``) runs N copies of the idle tree (``numprocs``), and memmon listens on
TICK_5 with ``-c -a 4GB`` (every program, its descendants included, a limit no idle tree
reaches), as a supervisord + memmon user would watch a fleet. Their own CPU (utime+stime of
supervisord and memmon together, % of one core) and RSS are measured over the same window as
the daemon's. memmon's cost comes in bursts every 5 s (one ``ps`` of the whole system and an
XML-RPC round trip per program), so the window covers several of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import clean_env, cpu_seconds, short_tmpdir, status_mb, stop_process, wait_until
from bench.peer import HEADER, MEMMON, SUPERVISORD

# A sleep no other tree uses, so anything left behind is found (and killed) by its argv.
TAG_SLEEP = "sleep 100017"
CONFIG = """\
[program:idle]
command=sh -c "{tag} & {tag} & wait"
process_name=idle_%(process_num)03d
numprocs={n}
autostart=true
autorestart=false
startsecs=0
stopasgroup=true
killasgroup=true
stopwaitsecs=5
stdout_logfile=/dev/null
redirect_stderr=true

[eventlistener:memmon]
command={memmon} -c -a 4GB
events=TICK_5
stderr_logfile={dir}/memmon.log
"""


@dataclass(frozen=True, slots=True)
class FleetUsage:
    cpu_pct: float  # supervisord + memmon, of one core
    rss_mb: float  # supervisord + memmon
    programs: int
    started_s: float

    def as_dict(self) -> dict[str, float]:
        return {
            "cpu_pct": round(self.cpu_pct, 3),
            "rss_mb": round(self.rss_mb, 1),
            "programs": self.programs,
            "started_s": round(self.started_s, 1),
        }


def measure(n: int, window_s: float, warmup_s: float) -> FleetUsage:
    """Start the fleet, wait until every program runs, warm up, measure, stop it all."""
    workdir = short_tmpdir("mf")
    (workdir / "supervisord.conf").write_text(
        HEADER.format(dir=workdir, options="minfds=8192")
        + CONFIG.format(dir=workdir, tag=TAG_SLEEP, n=n, memmon=MEMMON)
    )
    t0 = time.monotonic()
    with open(workdir / "stderr", "wb") as out:
        proc = subprocess.Popen(
            [str(SUPERVISORD), "-n", "-c", str(workdir / "supervisord.conf")],
            cwd=workdir,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(lambda: len(_children(proc.pid)) >= n + 1, timeout_s=300, what="the fleet")
        started_s = time.monotonic() - t0
        memmon = _memmon_pid(proc.pid)
        time.sleep(warmup_s)
        pids = [proc.pid, memmon]
        cpu0, w0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        time.sleep(window_s)
        cpu1, w1 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        rss = sum(status_mb(p) for p in pids)
        return FleetUsage(100.0 * (cpu1 - cpu0) / (w1 - w0), rss, n, started_s)
    finally:
        stop_process(proc, 120)
        _kill_leftovers()
        with contextlib.suppress(OSError):
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()


def _children(pid: int) -> list[int]:
    try:
        return [int(w) for w in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _memmon_pid(supervisord: int) -> int:
    for pid in _children(supervisord):
        with contextlib.suppress(OSError):
            if "memmon" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
    raise RuntimeError("memmon did not start under supervisord")


def _kill_leftovers() -> None:
    """Sleeps of ours that outlived supervisord's stop (they should not): killed by pid."""
    tag = TAG_SLEEP.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").strip() == tag:
                os.kill(int(name), signal.SIGKILL)
