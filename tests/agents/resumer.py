"""A test agent that says how it was started, for the restart and resume tests.

    python tests/agents/resumer.py FILE [--say TEXT] [--rate MB/S] [--exit-code N] [ARG ...]
Appends one JSON line to FILE: its arguments after FILE, CLAUDE_PM_RUN, CLAUDE_PM_RESTARTS
and CLAUDE_PM_SESSION_UUID. Then prints ``--say`` (``session: abc123``, say), and leaks at
``--rate`` (bounded by ``--cap``) or exits with ``--exit-code`` after ``--duration``.
Arguments it does not know (``--session-id X``, ``--resume X``) are only recorded, as a
real agent CLI would take them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from supervisord import simagent


def main() -> int:
    path, args = sys.argv[1], sys.argv[2:]
    seen = {
        "argv": args,
        "run": os.environ.get("CLAUDE_PM_RUN"),
        "restarts": os.environ.get("CLAUDE_PM_RESTARTS"),
        "session_uuid": os.environ.get("CLAUDE_PM_SESSION_UUID"),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(seen) + "\n")
    p = argparse.ArgumentParser()
    p.add_argument("--say", default=None)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--cap", type=float, default=400.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--exit-code", type=int, default=0)
    known, _ = p.parse_known_args(args)
    if known.say is not None:
        print(known.say, flush=True)
    simagent.grow(10.0, known.rate, known.cap, known.duration)
    return int(known.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
