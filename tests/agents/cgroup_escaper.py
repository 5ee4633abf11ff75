"""A test agent that moves itself out of its memory cgroup, then leaks.

    python tests/agents/cgroup_escaper.py [--rate MB/S] [--cap MB]
Writes its own pid into the ``cgroup.procs`` of its memory cgroup's parent (allowed as root
on cgroup v1), prints where it went, then grows as ``simagent`` does: what a user reported
Claude Code doing to get out from under ``systemd-run --scope -p MemoryMax=``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from supervisord import simagent

V1_MEMORY = Path("/sys/fs/cgroup/memory")


def own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_MEMORY / path.lstrip("/")
    raise SystemExit("no cgroup v1 memory controller line in /proc/self/cgroup")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--cap", type=float, default=400.0)
    p.add_argument("--duration", type=float, default=30.0)
    args = p.parse_args()
    parent = own_memory_cgroup().parent
    (parent / "cgroup.procs").write_text(str(os.getpid()))
    print(f"escaped to {parent}", flush=True)
    simagent.grow(10.0, args.rate, args.cap, args.duration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
