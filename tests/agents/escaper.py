"""A test agent whose grandchild escapes: fork, setsid, fork again, the middle one exits.

The grandchild is then nobody's child in the agent's tree (it is reparented to the nearest
subreaper), in a session of its own, and it leaks. The agent itself idles until killed.

    python tests/agents/escaper.py --leak-rate 100 --leak-cap 400 --pidfile /tmp/x/escaped
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from supervisord.simagent import grow


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--leak-rate", type=float, default=100.0)
    p.add_argument("--leak-cap", type=float, default=float("inf"))
    p.add_argument("--delay", type=float, default=0.5, help="idle before leaking")
    p.add_argument("--pidfile", required=True)
    args = p.parse_args()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(args.pidfile + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(args.pidfile + ".tmp", args.pidfile)
            time.sleep(args.delay)
            grow(5.0, args.leak_rate, args.leak_cap, None)
            os._exit(0)
        os._exit(0)
    os.wait()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
