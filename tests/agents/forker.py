"""A test agent that forks a tree: N children, each with a grandchild; the last one leaks.

    python tests/agents/forker.py --children 2 --hold-mb 5 --leak-rate 100 --leak-cap 400
Prints each pid it creates as ``pid <n>`` lines to stdout (the agent log).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from supervisord.simagent import grow, touch


def child(depth: int, hold_mb: float, leak: bool, rate: float, cap: float) -> None:
    if depth > 0:
        if os.fork() == 0:
            child(depth - 1, hold_mb, leak, rate, cap)
            os._exit(0)
        leak = False  # Only the deepest process of the leaking branch grows.
    print(f"pid {os.getpid()} depth {depth}", flush=True)
    if leak:
        grow(hold_mb, rate, cap, None)
    else:
        keep = touch(hold_mb)
        while True:
            time.sleep(3600)
        del keep


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--children", type=int, default=2)
    p.add_argument("--hold-mb", type=float, default=5.0)
    p.add_argument("--leak-rate", type=float, default=0.0)
    p.add_argument("--leak-cap", type=float, default=float("inf"))
    p.add_argument("--ignore-term", action="store_true")
    args = p.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"pid {os.getpid()} root", flush=True)
    for n in range(args.children):
        leak = args.leak_rate > 0 and n == args.children - 1
        if os.fork() == 0:
            child(1, args.hold_mb, leak, args.leak_rate, args.leak_cap)
            os._exit(0)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
