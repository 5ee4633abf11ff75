"""The composition root: wires config, logs, supervisor and control server into one daemon.

``serve`` runs until SIGTERM, SIGINT or a ``shutdown`` request, then stops every agent with
the usual escalation (unless asked to leave them), writes their records and removes the
socket and pid file. SIGHUP reloads the configuration.
"""

from __future__ import annotations

import fcntl
import grp
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import SocketListener, TaskStatus

from supervisord import __version__
from supervisord.config.home import Home
from supervisord.config.settings import ENV_VARIABLES, Config, load_config
from supervisord.control.commands import Commands
from supervisord.control.server import ControlServer
from supervisord.core.clock import timestamps
from supervisord.core.errors import ConfigError, DaemonAlreadyRunning
from supervisord.core.history import PeakHistory
from supervisord.core.records import AgentRecord
from supervisord.host import reaper, statefile, statshistory
from supervisord.host.cgroup.backstop import Backstop
from supervisord.host.cgroup.detect import detect, group_name
from supervisord.host.sysmem import enclosing_mb
from supervisord.observe import metrics_http, webhooks
from supervisord.observe.eventlog import EventLog
from supervisord.supervise.supervisor import Supervisor

log = structlog.get_logger("supervisord.daemon")


@dataclass
class Daemon:
    """State around the supervisor that commands may ask for: reload, shutdown, identity."""

    home: Home
    config_path: Path
    environ: dict[str, str]
    socket_path: Path
    supervisor: Supervisor
    shutdown: anyio.Event = field(default_factory=anyio.Event)
    leave_agents: bool = False
    started_wall: dict[str, str] = field(default_factory=timestamps)
    started_at: float = field(default_factory=time.monotonic)

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "home": str(self.home.root),
            "socket": str(self.socket_path),
            "started_at": self.started_wall["timestamp"],
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }

    def reload(self, env: Mapping[str, str] | None) -> dict[str, Any]:
        """Re-read the file and the guide's variables; an invalid config keeps the old one."""
        environ = dict(self.environ)
        if env is not None:
            # The caller's view of the guide's variables replaces the daemon's own wholesale,
            # so `unset CLAUDE_PM_MEMORY_MAX_MB; claude-pm reload` goes back to the file.
            for name in ENV_VARIABLES:
                environ.pop(name, None)
            environ.update({k: v for k, v in env.items() if k in ENV_VARIABLES})
        try:
            config = load_config(self.config_path, environ, enclosing_mb=enclosing_mb())
        except ConfigError as exc:
            log.error("reload_rejected", error=str(exc))
            raise
        self.environ = environ
        self.supervisor.apply_config(config)
        log.info("config_reloaded", sources=list(config.sources))
        return {"reloaded": True, "config": config.public()}

    def request_shutdown(self, *, leave_agents: bool) -> None:
        self.leave_agents = leave_agents
        self.shutdown.set()


def acquire_lock(home: Home, stack: ExitStack) -> None:
    """One daemon per home: an flock that dies with its holder, so a crash never blocks a start."""
    home.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(home.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = read_pid(home)
        raise DaemonAlreadyRunning(
            f"a daemon (pid {holder or 'unknown'}) already runs for {home.root}; "
            "use `claude-pm status`, or `claude-pm shutdown` first"
        ) from None
    stack.callback(os.close, fd)


def read_pid(home: Home) -> int | None:
    try:
        return int(home.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def prepare_home(home: Home, group: int | None = None) -> None:
    """Create the layout; ``run/`` is 0700, or 0710 for ``group`` (allowed_groups) to reach
    the socket inside without listing or reading anything else there."""
    for directory in (home.root, home.logs, home.alerts_log.parent, home.agent_logs):
        directory.mkdir(parents=True, exist_ok=True)
    home.run.mkdir(parents=True, exist_ok=True)
    if group is None:
        os.chmod(home.run, 0o700)
    else:
        os.chown(home.run, -1, group)
        os.chmod(home.run, 0o710)


def socket_group(config: Config) -> int | None:
    groups = config.daemon.allowed_groups
    return grp.getgrnam(groups[0]).gr_gid if groups else None


async def bind_listener(
    path: Path, stack: ExitStack, group: int | None = None
) -> tuple[SocketListener, Callable[[], None]]:
    """Bind the control socket 0600 (0660 for ``group``); the lock is held, so any file
    already there is stale."""
    _clear_stale(path)
    old_umask = os.umask(0o177)
    try:
        listener = await anyio.create_unix_listener(path)
    finally:
        os.umask(old_umask)
    if group is None:
        os.chmod(path, 0o600)
    else:
        os.chown(path, -1, group)
        os.chmod(path, 0o660)
    inode = os.stat(path).st_ino
    stack.callback(_unlink_if_ours, path, inode)
    return listener, lambda: _unlink_if_ours(path, inode)


def _nothing() -> None:
    """Releasing an inherited socket: systemd's file, left alone."""


def _clear_stale(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with suppress(FileNotFoundError):
        path.unlink()


def _unlink_if_ours(path: Path, inode: int) -> None:
    with suppress(OSError):
        if os.stat(path).st_ino == inode:
            path.unlink()


async def serve(
    config: Config,
    home: Home,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    inherited: socket.socket | None = None,
    reap_orphans: bool = False,
    handle_signals: bool = True,
    on_tick: Callable[[int], None] | None = None,
    tick_at_least_every_s: float | None = None,
    task_status: TaskStatus[Path] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one daemon for ``home`` until asked to stop; reports the socket path when ready."""
    with ExitStack() as stack:
        prepare_home(home, socket_group(config))
        acquire_lock(home, stack)
        listener, socket_path, release_socket = await _listen(config, home, inherited, stack)
        home.pid_file.write_text(f"{os.getpid()}\n")
        stack.callback(home.pid_file.unlink, missing_ok=True)
        state = statefile.load(home.state_file)
        records = state.records
        supervisor = _supervisor(config, home, records, stack, reap_orphans)
        supervisor.on_tick, supervisor.tick_at_least_every_s = on_tick, tick_at_least_every_s
        daemon = Daemon(
            home=home,
            config_path=config_path or home.config_file,
            environ=dict(os.environ if environ is None else environ),
            socket_path=socket_path,
            supervisor=supervisor,
        )
        server = ControlServer(Commands(supervisor, daemon), config.daemon, supervisor.bus)
        async with anyio.create_task_group() as tg:
            # Observers subscribe to the bus before any agent (a re-adopted one included) can
            # publish; a metrics address that cannot be bound fails the start, with its key.
            if config.metrics.listen is not None:
                await tg.start(metrics_http.serve, supervisor, config.metrics)
            await tg.start(webhooks.serve, supervisor)
            await tg.start(supervisor.run)
            for problem in state.problems:
                log.error("state_unreadable", problem=problem)
            supervisor.adopt(records)
            supervisor.adopt_leftovers()
            supervisor.restore_waiting(state)
            await tg.start(server.serve, listener)
            if handle_signals:
                tg.start_soon(_signals, daemon)
            log.info(
                "daemon_started",
                pid=os.getpid(),
                socket=str(socket_path),
                home=str(home.root),
                config=config.public(),
            )
            task_status.started(socket_path)
            await daemon.shutdown.wait()
            await _stop(daemon, server, release_socket)
            tg.cancel_scope.cancel()
        log.info("daemon_stopped")


def _supervisor(
    config: Config,
    home: Home,
    records: list[AgentRecord],
    stack: ExitStack,
    reap_orphans: bool,
) -> Supervisor:
    """The supervisor with its record logs and, where the kernel allows, the cgroup backstop."""
    eventlog = EventLog(home, config.daemon.log_max_bytes, config.daemon.log_backups)
    stack.callback(eventlog.close)
    backstop, cgroup_status = open_backstop(config, home, records)
    if backstop is not None:
        stack.callback(backstop.close)
    history = PeakHistory()
    for agent_type, peak_mb, aborted in statshistory.recent_runs(home.stats_log):
        history.add(agent_type, peak_mb, aborted=aborted)
    supervisor = Supervisor(
        config, home, eventlog, reap_orphans=reap_orphans, backstop=backstop, history=history
    )
    supervisor.cgroup_status = cgroup_status
    return supervisor


async def _listen(
    config: Config, home: Home, inherited: socket.socket | None, stack: ExitStack
) -> tuple[SocketListener, Path, Callable[[], None]]:
    """The control socket: systemd's (whose file is left alone), or one bound here."""
    if inherited is not None:
        # systemd owns an inherited socket's file: neither bind, chmod nor unlink it here.
        listener: SocketListener = await SocketListener.from_socket(inherited)
        return listener, Path(inherited.getsockname()), _nothing
    socket_path = home.socket_path(config.daemon.socket)
    listener, release = await bind_listener(socket_path, stack, socket_group(config))
    return listener, socket_path, release


async def _stop(daemon: Daemon, server: ControlServer, release_socket: Callable[[], None]) -> None:
    """Clients (and `claude-pm init`) see no daemon from now on; the lock stays held until
    every agent is stopped, so a new daemon waits for this one to finish."""
    supervisor = daemon.supervisor
    await server.stop_accepting()
    release_socket()
    log.info("daemon_stopping", agents=len(supervisor.agents), leave_agents=daemon.leave_agents)
    with anyio.CancelScope(shield=True):
        if not daemon.leave_agents:
            await supervisor.stop_all()
        # With --leave-agents this keeps them in run/state.json for the next daemon.
        await supervisor.state_writer.write()


def open_backstop(
    config: Config, home: Home, records: list[AgentRecord]
) -> tuple[Backstop | None, dict[str, Any]]:
    """Per-agent memory cgroups, where the daemon may create them (``[cgroup] mode``).

    Groups a crashed daemon left behind are removed when empty; those of agents in
    ``state.json`` are kept for re-adoption, and populated ones it does not name are handed
    to the supervisor (``adopt_leftovers``). ``required`` without cgroups refuses to start.
    """
    settings = config.cgroup
    detection = detect(settings.root, settings.mode, group=group_name(home.root))
    log.info("cgroups", **detection.as_dict())
    if detection.manager is None:
        return None, detection.as_dict()
    leftovers = detection.manager.cleanup_leftovers(r.subprocess_id for r in records)
    if leftovers.removed or leftovers.populated:
        log.info(
            "cgroup_leftovers", removed=list(leftovers.removed), populated=list(leftovers.populated)
        )
    backstop = Backstop(detection.manager, settings, detection, leftovers.populated)
    return backstop, backstop.status()


async def _signals(daemon: Daemon) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        reaper.quiet_wakeup_fd()  # each receiver opened sets the wakeup fd anew
        async for signum in signals:
            if signum == signal.SIGHUP:
                with suppress(ConfigError):
                    daemon.reload(None)
            else:
                log.info("signal_received", signal=signal.Signals(signum).name)
                daemon.request_shutdown(leave_agents=False)
