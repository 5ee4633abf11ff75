"""A simulated agent with a controllable memory appetite, for the demo, tests and benchmarks.

    python -m supervisord.simagent --hold-mb 30 --rate 50 --cap 400 --duration 20
grows from 30 MB at 50 MB/s up to 400 MB, then holds until 20 s have passed and exits.
``--in-child`` puts the growth in a forked child (the tree grows, not the agent process);
``--ignore-term`` makes every process ignore SIGTERM, so only SIGKILL ends it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from supervisord.core.units import MIB

PAGE = 4096
TICK_S = 0.01


def touch(n_mb: float) -> bytearray:
    """Allocate ``n_mb`` and write every page so it is resident, not just reserved."""
    size = int(n_mb * MIB)
    buf = bytearray(size)
    buf[::PAGE] = b"\x01" * len(range(0, size, PAGE))
    return buf


def grow(hold_mb: float, rate_mb_s: float, cap_mb: float, duration_s: float | None) -> None:
    chunks = [touch(hold_mb)] if hold_mb > 0 else []
    have = hold_mb
    start = time.monotonic()
    while duration_s is None or time.monotonic() - start < duration_s:
        now = time.monotonic()
        want = min(cap_mb, hold_mb + rate_mb_s * (now - start))
        if want > have:
            chunks.append(touch(want - have))
            have = want
        time.sleep(TICK_S)
    del chunks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="simagent", description=__doc__)
    p.add_argument("--hold-mb", type=float, default=10.0, help="memory taken at start")
    p.add_argument("--rate", type=float, default=0.0, help="growth in MB/s")
    p.add_argument("--cap", type=float, default=float("inf"), help="stop growing here (MB)")
    p.add_argument("--duration", type=float, default=None, help="exit after this many seconds")
    p.add_argument("--exit-code", type=int, default=0)
    p.add_argument("--in-child", action="store_true", help="grow in a forked child")
    p.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM")
    p.add_argument("--task", default="", help="task text (printed; for [agents] templates)")
    args = p.parse_args(argv)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.write(f"simagent pid {os.getpid()}: {vars(args)}\n")
    sys.stdout.flush()
    if args.in_child:
        pid = os.fork()
        if pid == 0:
            grow(args.hold_mb, args.rate, args.cap, args.duration)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return int(args.exit_code) if os.waitstatus_to_exitcode(status) == 0 else 1
    grow(args.hold_mb, args.rate, args.cap, args.duration)
    return int(args.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
