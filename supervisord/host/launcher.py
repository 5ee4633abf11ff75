"""Starting agents: own session and process group, output to the daemon, exit seen via pidfd.

``subprocess.Popen`` without ``preexec_fn`` keeps the fast vfork/posix_spawn path; asyncio's
child watcher is avoided because Python 3.11 starts a thread per child for it. An agent's
stdout and stderr are its FIFO (``host.agentlog``), which the daemon drains into its log.

An agent run as another user enters its ``cwd`` only after the privilege drop, in a shell
shim: ``Popen(cwd=...)`` would enter it as root, letting the user reach files through a
directory they may not search. The directory is checked against the user's ids up front
for a clear launch error; the shim is what enforces it (ACLs, races).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from supervisord.core.errors import LaunchError
from supervisord.core.identity import MARKER_ENV, TYPE_ENV
from supervisord.host import procfs
from supervisord.host.agentlog import AgentOutput, OutputPlace
from supervisord.host.cgroup.base import SHIM_FAILED_EXIT, AgentCgroup

# Raising is allowed without privileges: a system-wide OOM then picks an agent, not the daemon.
AGENT_OOM_SCORE_ADJ = 500
# Enter the directory as the agent's user, then become the agent (same pid); like the cgroup
# shim it exits 125 (its message in the agent's log) rather than run the agent elsewhere.
_CWD_SHIM = f'cd -- "$1" || exit {SHIM_FAILED_EXIT}; shift; exec "$@"'
_CWD_SHIM_NAME = "claude-pm-cwd-shim"


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
    # A line for the agent's log before its output (a run after the first: which one).
    banner: str | None = None


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
    # The daemon's side of the agent's stdout and stderr.
    output: AgentOutput = field(default_factory=AgentOutput.detached)


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


def spawn(spec: LaunchSpec, place: OutputPlace) -> Child:
    """Start the agent; raises :class:`LaunchError` with the reason when it cannot start.

    Its output goes to a new FIFO in ``place``, drained into ``spec.log_path`` (created now,
    owned by the agent's user); a launch that fails leaves neither behind.
    """
    env = dict(os.environ if spec.env is None else spec.env)
    env[MARKER_ENV] = spec.subprocess_id
    env[TYPE_ENV] = spec.agent_type
    cwd, shim_cwd = _directories(spec, env)
    owner = None if spec.user is None else (spec.user.uid, spec.user.gid)
    try:
        output, agent_end = AgentOutput.create(place, spec.subprocess_id, spec.log_path, owner)
    except OSError as exc:
        raise LaunchError(f"cannot set up the agent's output: {exc}") from exc
    if spec.banner is not None:
        output.note(spec.banner)
    placement = None
    try:
        argv: Sequence[str] = spec.command
        stdin: int = subprocess.DEVNULL
        if spec.cgroup is not None:
            placement = spec.cgroup.placement(spec.command, cwd=shim_cwd)
            argv, stdin = placement.argv, placement.stdin
        elif shim_cwd is not None:
            argv = ("/bin/sh", "-c", _CWD_SHIM, _CWD_SHIM_NAME, shim_cwd, *spec.command)
        popen = _popen(spec, argv, stdin, agent_end, cwd, env)
    except BaseException:
        output.discard()
        raise
    finally:
        os.close(agent_end)  # The agent's copy is all there is now: EOF when its tree is gone.
        if placement is not None:
            placement.close()
    pidfd = os.pidfd_open(popen.pid)
    start = procfs.start_time(popen.pid) or 0
    try:
        with open(f"/proc/{popen.pid}/oom_score_adj", "w", encoding="ascii") as f:
            f.write(str(AGENT_OOM_SCORE_ADJ))
    except OSError:
        pass  # Not on Linux, or the agent already exited: nothing to protect.
    return Child(pid=popen.pid, start=start, pidfd=pidfd, popen=popen, output=output)


def _directories(spec: LaunchSpec, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """Where Popen starts the agent and where a shim enters after the privilege drop, once
    the checks that give a clear launch error instead of a shim's exit status passed."""
    shim_cwd = None
    if spec.user is not None and spec.cwd is not None:
        shim_cwd = os.path.abspath(spec.cwd)  # absolute: cd must not consult CDPATH
        _require_enterable(shim_cwd, spec.user)
    if spec.cgroup is not None or shim_cwd is not None:
        # The shell shim would turn a missing executable into exit 127: say so up front.
        _require_executable(spec.command[0], env.get("PATH"), spec.cwd)
    return (None, shim_cwd) if shim_cwd is not None else (spec.cwd, None)


def _require_enterable(directory: str, user: Credentials) -> None:
    """Refuse a cwd whose path ``user`` may not search, by its mode bits (ACLs aside)."""
    if user.uid == 0:
        return
    groups = {user.gid, *user.groups}
    path = Path(directory)
    for step in (*reversed(path.parents), path):
        try:
            st = os.stat(step)
        except OSError:
            return  # Missing: said by the checks that follow, once the user may look.
        if _has_acl(step):
            return  # Its ACL may grant what the mode bits deny: the shim decides.
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise LaunchError(
                f"cwd {directory!r}: uid {user.uid} may not enter {str(step)!r} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:{st.st_gid})"
            )


def _has_acl(path: Path) -> bool:
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return False  # No ACL, or a file system without them.
    return True


def _popen(
    spec: LaunchSpec,
    argv: Sequence[str],
    stdin: int,
    stdout: int,
    cwd: str | None,
    env: Mapping[str, str],
) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=cwd,
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


def adopt(
    pid: int, start: int, place: OutputPlace | None = None, subprocess_id: str = ""
) -> Child | None:
    """A pidfd on a running agent left by a previous daemon, if ``pid`` is still that process.

    With ``place``, its output FIFO is opened again (or, for one that ended, removed).
    """
    child = _adopt(pid, start)
    if place is not None:
        if child is None:
            place.forget(subprocess_id)
        else:
            child.output = AgentOutput.reopen(place, subprocess_id)
    return child


def _adopt(pid: int, start: int) -> Child | None:
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


def release(child: Child) -> None:
    """Stop holding a process we no longer watch (its pidfd; never a signal)."""
    if child.pidfd >= 0:
        os.close(child.pidfd)
        child.pidfd = -1


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
