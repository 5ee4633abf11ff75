"""Starting agents: own session and process group, output to a log file, exit seen via pidfd.

``subprocess.Popen`` without ``preexec_fn`` keeps the fast vfork/posix_spawn path; asyncio's
child watcher is avoided because Python 3.11 starts a thread per child for it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from supervisord.core.errors import LaunchError
from supervisord.core.identity import MARKER_ENV, TYPE_ENV
from supervisord.host import procfs
from supervisord.host.cgroup.base import AgentCgroup

# Raising is allowed without privileges: a system-wide OOM then picks an agent, not the daemon.
AGENT_OOM_SCORE_ADJ = 500


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who an agent runs as when a root daemon launches for another user."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    subprocess_id: str
    agent_type: str
    command: tuple[str, ...]
    log_path: Path
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    user: Credentials | None = None
    # The agent's memory cgroup: a shim joins it before exec'ing the command.
    cgroup: AgentCgroup | None = None


@dataclass(frozen=True, slots=True)
class ExitStatus:
    exit_code: int | None
    signal: str | None

    def describe(self) -> str:
        if self.signal:
            return f"killed by {self.signal}"
        return "status unknown" if self.exit_code is None else f"exit code {self.exit_code}"


@dataclass(slots=True)
class Child:
    pid: int
    start: int
    pidfd: int
    # None for an agent re-adopted after a daemon restart: not our child, so its exit is
    # seen through the pidfd but its status cannot be reaped (its new parent reaps it).
    popen: subprocess.Popen[bytes] | None = None


def _require_executable(name: str, path: str | None, cwd: str | None) -> None:
    if "/" in name:
        full = Path(cwd or ".") / name
        if not (full.is_file() and os.access(full, os.X_OK)):
            raise LaunchError(f"executable {name!r} not found or not executable")
    elif shutil.which(name, path=path) is None:
        raise LaunchError(f"executable {name!r} not found (PATH or absolute path)")
    if cwd and not Path(cwd).is_dir():
        raise LaunchError(f"cwd {cwd!r} does not exist")


def new_subprocess_id(agent_type: str) -> str:
    return f"{agent_type}_{secrets.token_hex(6)}"


def spawn(spec: LaunchSpec) -> Child:
    """Start the agent; raises :class:`LaunchError` with the reason when it cannot start."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if spec.env is None else spec.env)
    env[MARKER_ENV] = spec.subprocess_id
    env[TYPE_ENV] = spec.agent_type
    argv: Sequence[str] = spec.command
    stdin: int = subprocess.DEVNULL
    placement = None
    if spec.cgroup is not None:
        # The shell shim would turn a missing executable into exit 127: say so up front.
        _require_executable(spec.command[0], env.get("PATH"), spec.cwd)
        placement = spec.cgroup.placement(spec.command)
        argv, stdin = placement.argv, placement.stdin
    try:
        with open(spec.log_path, "ab") as log:
            if spec.user is not None:
                os.fchown(log.fileno(), spec.user.uid, spec.user.gid)
            popen = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                user=None if spec.user is None else spec.user.uid,
                group=None if spec.user is None else spec.user.gid,
                extra_groups=None if spec.user is None else list(spec.user.groups),
            )
    except FileNotFoundError as exc:
        missing = exc.filename if exc.filename else spec.command[0]
        if spec.cwd and not Path(spec.cwd).is_dir():
            raise LaunchError(f"cwd {spec.cwd!r} does not exist") from exc
        raise LaunchError(f"executable {missing!r} not found (PATH or absolute path)") from exc
    except PermissionError as exc:
        raise LaunchError(f"cannot run {spec.command[0]!r}: {exc.strerror}") from exc
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"cannot start {spec.command[0]!r}: {exc}") from exc
    finally:
        if placement is not None:
            placement.close()
    pidfd = os.pidfd_open(popen.pid)
    start = procfs.start_time(popen.pid) or 0
    try:
        with open(f"/proc/{popen.pid}/oom_score_adj", "w", encoding="ascii") as f:
            f.write(str(AGENT_OOM_SCORE_ADJ))
    except OSError:
        pass  # Not on Linux, or the agent already exited: nothing to protect.
    return Child(pid=popen.pid, start=start, pidfd=pidfd, popen=popen)


def adopt(pid: int, start: int) -> Child | None:
    """A pidfd on a running agent left by a previous daemon, if ``pid`` is still that process."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    # Checked after opening: the pidfd now pins whatever process has this pid. A zombie
    # ended while no daemon watched it: that is a lost agent, not one to adopt.
    entry = procfs.read_entry(pid)
    if entry is None or entry.start != start or entry.zombie:
        os.close(pidfd)
        return None
    return Child(pid=pid, start=start, pidfd=pidfd)


UNKNOWN_EXIT = ExitStatus(exit_code=None, signal=None)


async def wait_exit(child: Child) -> ExitStatus:
    """Wait for the agent's own process to end and reap it through its pidfd."""
    await anyio.wait_readable(child.pidfd)
    try:
        # The pidfd is readable only once the process has ended, so this returns at once.
        info = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)  # noqa: ASYNC222
    except ChildProcessError:
        info = None  # A re-adopted agent: its parent, not us, gets its status.
    finally:
        os.close(child.pidfd)
        child.pidfd = -1
    if info is None:
        return UNKNOWN_EXIT
    if info.si_code == os.CLD_EXITED:
        status = ExitStatus(exit_code=info.si_status, signal=None)
        returncode = info.si_status
    else:
        status = ExitStatus(exit_code=None, signal=signal.Signals(info.si_status).name)
        returncode = -info.si_status
    if child.popen is not None:
        child.popen.returncode = returncode  # so subprocess never waits on it again
    return status
