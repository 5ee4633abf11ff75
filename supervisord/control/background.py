"""Starting a daemon in the background for ``claude-pm init`` and the compatibility API."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisord.config.home import Home
from supervisord.config.settings import write_default_config
from supervisord.control.client import Client, resolve_socket
from supervisord.core.errors import DaemonNotRunning, SupervisordError

READY_TIMEOUT_S = 15.0
LOCK_WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class Started:
    pid: int
    socket_path: Path
    already_running: bool


def ensure_home(home: Home) -> bool:
    """Create the home and its default config; returns whether the config was written."""
    for directory in (home.root, home.logs, home.alerts_log.parent, home.agent_logs, home.run):
        directory.mkdir(parents=True, exist_ok=True)
    os.chmod(home.run, 0o700)
    return write_default_config(home.config_file)


def running_pid(home: Home) -> int | None:
    """The pid of the daemon that answers for ``home``, or None."""
    try:
        with Client(resolve_socket(home), timeout_s=5) as client:
            return int(client.hello()["pid"])
    except (DaemonNotRunning, OSError):
        return None


def daemon_command() -> list[str]:
    """The daemon's argv: via the console script when installed, so its command line says
    ``claude-pm`` (the guide's emergency `pkill -f "claude-pm"` finds it)."""
    script = Path(sys.executable).with_name("claude-pm-supervisord")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "supervisord", "daemon"]


def wait_for_lock(home: Home, timeout_s: float = LOCK_WAIT_S) -> None:
    """A daemon that stopped answering may still be stopping its agents: wait for it."""
    try:
        fd = os.open(home.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SupervisordError(
                        f"the daemon of {home.root} holds its lock but does not answer; "
                        f"see {home.daemon_log}"
                    ) from None
                time.sleep(0.1)
    finally:
        os.close(fd)  # Closing releases our flock, so the new daemon can take it.


def start_daemon(home: Home, environ: Mapping[str, str] | None = None) -> Started:
    """Start ``claude-pm daemon`` detached and wait until it answers; idempotent."""
    socket_path = resolve_socket(home)
    pid = running_pid(home)
    if pid is not None:
        return Started(pid=pid, socket_path=socket_path, already_running=True)
    ensure_home(home)
    wait_for_lock(home)
    env = dict(os.environ if environ is None else environ)
    env["CLAUDE_PM_HOME"] = str(home.root)
    # `daemon --detach` forks, and its parent exits once the child answers (or failed), so the
    # daemon is never our child: no zombie, and start-up errors come back on stderr right here.
    try:
        done = subprocess.run(
            [*daemon_command(), "--detach"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(home.root),
            timeout=READY_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SupervisordError(
            f"the daemon did not answer at {socket_path} within {READY_TIMEOUT_S:g} s; "
            f"see {home.daemon_log}"
        ) from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"exit code {done.returncode}"
        raise SupervisordError(f"the daemon failed to start: {message}")
    pid = running_pid(home)
    if pid is None:
        raise SupervisordError(f"the daemon started but does not answer at {socket_path}")
    return Started(pid=pid, socket_path=socket_path, already_running=False)


def wait_stopped(home: Home, pid: int, poll_s: float = 0.1) -> None:
    """Until the daemon ``pid`` is gone: it stops answering first, then stops its agents,
    and its lock goes last, once it has exited."""
    while running_pid(home) == pid:
        time.sleep(poll_s)
    wait_for_lock(home)
