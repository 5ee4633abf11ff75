"""``claude-pm demo``: the whole escalation in well under a minute, in a throwaway home.

Five simulated agents under deliberately small limits (warning 100 MB, critical 200 MB,
max 300 MB, kernel ceiling 450 MB where memory cgroups are available): a steady one, a slow
leaker that crosses warning and critical and then exits, a fast leaker stopped by SIGTERM at
the hard limit, one that ignores SIGTERM and is SIGKILLed after the grace period, and a
runaway that ignores SIGTERM and would outgrow the grace: the kernel ceiling holds it and
the daemon kills it on the OOM event. Peak memory stays under about 1.3 GB.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomli_w

from supervisord.cli import render
from supervisord.config.home import Home
from supervisord.control import background
from supervisord.control.client import Client, resolve_socket

LIMITS = {
    "warning_mb": 100,
    "critical_mb": 200,
    "max_mb": 300,
    "check_interval_s": 0.5,
    "term_grace_s": 2,
}
AGENTS: list[tuple[str, str, list[str]]] = [
    ("steady", "holds 30 MB for 14 s, then exits 0", ["--hold-mb", "30", "--duration", "14"]),
    (
        "slow-leaker",
        "grows 25 MB/s to 240 MB (warning, critical), exits 0 at 14 s",
        ["--hold-mb", "10", "--rate", "25", "--cap", "240", "--duration", "14"],
    ),
    (
        "fast-leaker",
        "grows 150 MB/s until it hits max_mb; dies on SIGTERM",
        ["--hold-mb", "10", "--rate", "150", "--cap", "600"],
    ),
    (
        "stubborn",
        "grows 120 MB/s in a child to 380 MB, ignores SIGTERM; SIGKILLed after grace",
        ["--hold-mb", "10", "--rate", "120", "--cap", "380", "--in-child", "--ignore-term"],
    ),
    (
        "runaway",
        "grows 300 MB/s, ignores SIGTERM; held at the kernel ceiling, killed on the OOM event",
        ["--hold-mb", "10", "--rate", "300", "--ignore-term"],
    ),
]
# The kernel ceiling (per-agent memory cgroup) sits 50% above max_mb: room for the grace
# period to play out for "stubborn", none for "runaway".
CGROUP = {"hard_margin_pct": 50}
DEADLINE_S = 50.0


def run() -> int:
    root = Path(tempfile.mkdtemp(prefix="claude-pm-demo-"))
    home = Home(root / ".claude-pm")
    os.environ["CLAUDE_PM_HOME"] = str(home.root)
    try:
        return _run(home)
    finally:
        _shutdown(home)
        shutil.rmtree(root, ignore_errors=True)


def _run(home: Home) -> int:
    home.config_file.parent.mkdir(parents=True)
    home.config_file.write_text(tomli_w.dumps({"memory": LIMITS, "cgroup": CGROUP}))
    print(f"home: {home.root}")
    print("limits: " + ", ".join(f"{k} {v}" for k, v in LIMITS.items()))
    started = background.start_daemon(home, {**os.environ, "CLAUDE_PM_HOME": str(home.root)})
    print(f"daemon started, pid {started.pid}")
    with Client(resolve_socket(home)) as client:
        cgroups = client.status()["cgroups"]
    print(f"kernel backstop: {cgroups['in_force']} ({cgroups['reason']})\n")
    socket_path = resolve_socket(home)
    ended: dict[str, dict[str, Any]] = {}
    all_ended = threading.Event()
    t0 = time.monotonic()
    subscription = Client(socket_path, timeout_s=DEADLINE_S)
    events = subscription.subscribe(types=["alert", "exit"])
    watcher = threading.Thread(target=_watch, args=(events, t0, ended, all_ended), daemon=True)
    watcher.start()
    with Client(socket_path) as client:
        for agent_type, what, agent_args in AGENTS:
            result = client.launch(
                agent_type, [sys.executable, "-m", "supervisord.simagent", *agent_args]
            )
            print(f"{_clock(t0)} launched {result['subprocess_id']}: {what}")
        print()
        if not all_ended.wait(DEADLINE_S):
            print("demo: agents did not all end in time", file=sys.stderr)
            return 1
    print(f"\n{_clock(t0)} all {len(AGENTS)} agents have ended.\n")
    _show(home)
    return 0


def _watch(
    events: Iterator[dict[str, Any]], t0: float, ended: dict[str, Any], done: threading.Event
) -> None:
    for event in events:
        print(f"{_clock(t0)} {render.event(event)}", flush=True)
        if event["type"] == "exit":
            ended[event["subprocess_id"]] = event
            if len(ended) == len(AGENTS):
                done.set()
                return


def _show(home: Home) -> None:
    print(f"== {home.alerts_log} (jq 'select(.level == \"CRITICAL\")' works on it)")
    for line in home.alerts_log.read_text().splitlines():
        r = json.loads(line)
        print(f"  {r['level']:<8} {r['event']:<16} {r['subprocess_id']:<26} {r['message']}")
    print(f"\n== {home.stats_log}")
    for line in home.stats_log.read_text().splitlines():
        r = json.loads(line)
        m = r["memory_stats"]
        print(
            f"  {r['subprocess_id']:<26} reason={r['reason']:<13} signal={r['signal']!s:<8} "
            f"exit_code={r['exit_code']!s:<5} peak={m['peak_mb']:.1f} MB aborted={m['aborted']}"
        )
    print(
        "\nTry the same on your own agents: `claude-pm init`, then "
        "`claude-pm launch engineer -- <command>`."
    )


def _shutdown(home: Home) -> None:
    try:
        with Client(resolve_socket(home), timeout_s=30) as client:
            pid = client.hello()["pid"]
            client.shutdown()
        deadline = time.monotonic() + 20
        while background.running_pid(home) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:
        pass


def _clock(t0: float) -> str:
    return f"[{time.monotonic() - t0:5.1f}s]"
