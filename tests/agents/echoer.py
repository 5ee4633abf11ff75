"""An interactive test agent: answers each line typed at it, until end of input or Ctrl-C.

    python tests/agents/echoer.py
Prints ``ready``, then ``answer: <line>`` for every line it reads from its stdin.
"""

from __future__ import annotations

import sys


def main() -> int:
    print("ready", flush=True)
    for line in sys.stdin:
        print(f"answer: {line.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
