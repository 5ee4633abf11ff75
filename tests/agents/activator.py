"""Socket activation as systemd does it: the listening socket at fd 3, LISTEN_PID = our pid.

    python tests/agents/activator.py FD -- COMMAND [ARG ...]
exec keeps the pid, so LISTEN_PID names the command that runs next.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    fd = int(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    if fd != 3:
        os.dup2(fd, 3)  # inheritable by default
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="control")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
