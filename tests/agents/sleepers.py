"""A test agent that starts many ``sleep`` processes and keeps them.

    python tests/agents/sleepers.py --count 1000 --seconds 120
Prints ``ready <count>`` once every sleep has been spawned, then reaps them as they end and
exits after the last. Each sleep is ~1.7 MB resident, nearly all of it pages of the binary
and libc that every sleep shares: an RSS sum counts them once per process, the memory cgroup
once. ``--seconds`` bounds how long anything outlives a test that could not stop it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=120.0)
    args = p.parse_args()
    sleep = shutil.which("sleep") or "/bin/sleep"
    # posix_spawn (vfork + exec): 1,000 children in well under a second, even from Python.
    for _ in range(args.count):
        os.posix_spawn(sleep, ["sleep", f"{args.seconds:g}"], os.environ)
    print(f"pid {os.getpid()} ready {args.count}", flush=True)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0


if __name__ == "__main__":
    sys.exit(main())
