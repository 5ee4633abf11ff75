"""The idle agent of the overhead, control and launch benchmarks: a 3-process tree.

``sh -c 'sleep 100000 & sleep 100000 & wait'`` is a shell with two sleeping children, about
1 MB resident each. A Python agent would be ~10 MB a process: 500 trees of 3 would take
15 GB, more than the machine can spare beside the daemon, the baseline and other work. The
trees never exit on their own (the sleeps outlast any run); whoever started them kills them.

    python -m bench.idle_tree 5      start 5 trees in the foreground until Ctrl-C (a manual aid)
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

from bench.common import kill_group, start_time, wait_until
from supervisord.control.client import Client

COMMAND: tuple[str, ...] = ("sh", "-c", "sleep 100000 & sleep 100000 & wait")
PROCESSES_PER_TREE = 3
# What a tree asks of the host's budget: its ~3 MB, not warning_mb (the default request), so
# that 500 trees fit a budget of the machine's size and none waits in the admission queue.
REQUEST_MB = 4


def popen_tree() -> subprocess.Popen[bytes]:
    """One tree, started like the daemon starts an agent: in its own session, so that
    ``killpg(pid)`` reaches the sleeps as well as the shell."""
    return subprocess.Popen(
        COMMAND,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def kill_trees(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill each tree's whole group, then reap the shells (no zombies left behind)."""
    for proc in procs:
        if proc.poll() is None:
            kill_group(proc.pid, start_time(proc.pid))
    for proc in procs:
        proc.wait(10)


def wait_complete(client: Client, count: int, timeout_s: float = 120.0) -> None:
    """Until the daemon's own sample shows ``count`` whole trees (every shell has forked)."""

    def complete() -> bool:
        agents: list[dict[str, Any]] = client.stats()["agents"]
        whole = sum(1 for a in agents if len(a.get("tree_pids", ())) >= PROCESSES_PER_TREE)
        return whole >= count

    wait_until(complete, timeout_s, f"{count} complete trees", poll_s=0.5)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    count = int(args[0]) if args else 1
    procs = [popen_tree() for _ in range(count)]
    # Blocked after the spawns (children inherit the mask), so sigwait below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    print(f"{count} idle trees: " + " ".join(str(p.pid) for p in procs), flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        kill_trees(procs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
