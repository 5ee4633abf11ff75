"""The overhead baseline: the psutil loop most supervisors start with, in a process of its own.

Every interval, for each tree: ``children(recursive=True)`` and ``memory_info()`` of the root
and of every child. psutil finds children by reading every process's ppid, so one tree costs
a scan of all of /proc and N trees cost N scans: the work the daemon's one shared scan avoids.

    python -m bench.naive_sampler --interval 2 --pids-file PIDS --ticks-file TICKS

Each tick appends ``<seconds it took> <bytes summed>`` to TICKS. A tick longer than the
interval is followed at once by the next (the loop is then saturated, as such a loop would
be in production). It runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue  # Gone between the listing and the read: a naive loop shrugs too.
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.naive_sampler", description=__doc__)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--pids-file", type=Path, required=True)
    p.add_argument("--ticks-file", type=Path, required=True)
    args = p.parse_args(argv)
    roots = []
    for word in args.pids_file.read_text().split():
        try:
            roots.append(psutil.Process(int(word)))
        except psutil.Error:
            continue
    with open(args.ticks_file, "a", encoding="ascii") as out:
        next_tick = time.monotonic()
        while True:
            t0 = time.monotonic()
            total = sum(tree_rss(root) for root in roots)
            out.write(f"{time.monotonic() - t0:.6f} {total}\n")
            out.flush()
            next_tick += args.interval
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.monotonic()


if __name__ == "__main__":
    raise SystemExit(main())
