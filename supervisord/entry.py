"""The daemon as a process: configuration, logging, subreaper, systemd and detaching.

``serve`` (daemon.py) is the daemon as a coroutine; this module is what ``claude-pm daemon``
and ``claude-pm-supervisord`` add around it to be a well-behaved service.
"""

from __future__ import annotations

import ctypes
import os
import resource
import socket
import sys
import time
from contextlib import suppress
from functools import partial
from pathlib import Path

import anyio
import structlog

from supervisord import daemon
from supervisord.config.home import Home, find_home
from supervisord.config.settings import Config, load_config
from supervisord.host import sdnotify
from supervisord.host.sysmem import enclosing_mb
from supervisord.observe.eventlog import configure_daemon_log

PR_SET_CHILD_SUBREAPER = 36
FD_LIMIT = 65536
log = structlog.get_logger("supervisord.entry")


def become_subreaper() -> bool:
    """Descendants that double-fork away from an agent are then reparented to us, not init."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def raise_fd_limit() -> int:
    """One pidfd per agent and one kept-open statm fd per process: hundreds of agent trees
    pass the usual soft limit of 1024. Agents inherit the limit, so it is raised only as far
    as the systemd unit's LimitNOFILE, not to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT)
    if target > soft:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def run(*, detach: bool = False) -> int:
    """Run the daemon for the home found from here; returns the process exit code."""
    home = Home(find_home())
    # A ConfigError goes to the caller, before any fork.
    config = load_config(home.config_file, enclosing_mb=enclosing_mb())
    daemon.prepare_home(home)
    ready_fd = _detach(home.logs / "daemon-stderr.log") if detach else None
    configure_daemon_log(
        home,
        config.daemon.log_max_bytes,
        config.daemon.log_backups,
        echo=not detach and "JOURNAL_STREAM" in os.environ,
    )
    notifier = sdnotify.Notifier.from_env(unset_environment=True)
    watchdog_s = sdnotify.watchdog_interval_s(unset_environment=True)
    inherited = sdnotify.inherited_unix_listener(home.socket_path(config.daemon.socket))
    if inherited is not None:
        inherited.setblocking(False)
    subreaper = become_subreaper()
    raise_fd_limit()
    anyio.run(_main, config, home, inherited, subreaper, notifier, watchdog_s, ready_fd)
    return 0


async def _main(
    config: Config,
    home: Home,
    inherited: socket.socket | None,
    subreaper: bool,
    notifier: sdnotify.Notifier,
    watchdog_s: float | None,
    ready_fd: int | None,
) -> None:
    heartbeat = Heartbeat(notifier, watchdog_s)
    async with anyio.create_task_group() as tg:
        try:
            socket_path = await tg.start(
                partial(
                    daemon.serve,
                    config,
                    home,
                    inherited=inherited,
                    reap_orphans=subreaper,
                    on_tick=heartbeat,
                    tick_at_least_every_s=heartbeat.every_s,
                )
            )
        except BaseException as exc:
            _report_ready(ready_fd, f"error: {exc}")
            raise
        notifier.ready(f"listening on {socket_path}")
        _report_ready(ready_fd, "ready")
    notifier.stopping()


class Heartbeat:
    """Called by the sampling loop: a hung loop stops the watchdog pings, and systemd acts.

    systemd wants a ping at least every ``WatchdogSec``; the loop turns at least every quarter
    of it (``every_s``) and pings once half of that has passed, so a healthy loop, idle or
    not, pings well within half the interval, and a wedged one not at all.
    """

    def __init__(self, notifier: sdnotify.Notifier, watchdog_s: float | None) -> None:
        self.notifier = notifier
        self.every_s = (watchdog_s / 4) if watchdog_s else None
        self.last = 0.0
        self.last_count = -1

    def __call__(self, agent_count: int) -> None:
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        if self.every_s is not None and now - self.last >= self.every_s / 2:
            self.notifier.watchdog()
            self.last = now
        if agent_count != self.last_count:
            self.notifier.status(f"supervising {agent_count} agent(s)")
            self.last_count = agent_count


def _detach(stderr_path: Path) -> int:
    """Fork into the background; the parent exits when the child reports ready (or fails)."""
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "ready":
            os._exit(0)
        sys.stderr.write((message or "the daemon exited while starting") + "\n")
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    # A crash the structured log cannot record (a traceback) still lands somewhere to read.
    stderr = os.open(stderr_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(stderr, 2)
    os.close(stderr)
    return write_fd


def _report_ready(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode())
        os.close(fd)
    except OSError:
        pass
