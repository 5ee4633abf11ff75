"""What a launch request becomes before anything starts: command, memory check, spec.

Pure decisions plus one look at system memory; the supervisor spawns what this plans.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisord.config.settings import Config
from supervisord.core.errors import LaunchError
from supervisord.core.events import AlertEvent
from supervisord.core.kinds import AlertKind, EndReason
from supervisord.host.cgroup.base import AgentCgroup
from supervisord.host.launcher import Credentials, LaunchSpec

# What another user's agent is given to find programs with: the daemon's PATH is root's.
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    agent_type: str
    command: tuple[str, ...] | None = None
    task: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, Any] = field(default_factory=dict)
    force: bool = False
    user: Credentials | None = None
    owner_uid: int | None = None
    # request_mb, priority, on_pressure of this launch (over its type's).
    scheduling: Mapping[str, Any] = field(default_factory=dict)
    # False: refuse rather than wait when it does not fit the budget now.
    queue: bool = True
    # The restart keys of this launch (over its type's policy).
    restart: Mapping[str, Any] = field(default_factory=dict)
    # Start only once these agents have ended with exit code 0 (pueue's --after).
    after: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """For run/state.json: a queued launch survives a daemon restart."""
        return {
            "agent_type": self.agent_type,
            "command": None if self.command is None else list(self.command),
            "task": self.task,
            "cwd": self.cwd,
            "env": dict(self.env),
            "limits": dict(self.limits),
            "force": self.force,
            "user": None
            if self.user is None
            else [self.user.uid, self.user.gid, *self.user.groups],
            "owner_uid": self.owner_uid,
            "scheduling": dict(self.scheduling),
            "queue": self.queue,
            "restart": dict(self.restart),
            "after": list(self.after),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LaunchRequest:
        user = data.get("user")
        command = data.get("command")
        return cls(
            agent_type=data["agent_type"],
            command=None if command is None else tuple(command),
            task=data.get("task"),
            cwd=data.get("cwd"),
            env=dict(data.get("env") or {}),
            limits=dict(data.get("limits") or {}),
            force=bool(data.get("force", False)),
            user=None if not user else Credentials(user[0], user[1], tuple(user[2:])),
            owner_uid=data.get("owner_uid"),
            scheduling=dict(data.get("scheduling") or {}),
            queue=bool(data.get("queue", True)),
            restart=dict(data.get("restart") or {}),
            after=tuple(data.get("after") or ()),
        )


def resolve_command(config: Config, request: LaunchRequest, config_file: Path) -> tuple[str, ...]:
    """The request's command, or the type's ``[agents.<type>]`` template with ``{task}``."""
    if request.command:
        return tuple(request.command)
    agent_type = config.agent_type(request.agent_type)
    key = f"agents.{request.agent_type}.command"
    if agent_type.command is None:
        raise LaunchError(
            f"no command for agent type {request.agent_type!r}: set {key} in "
            f'{config_file} (e.g. command = ["claude", "-p", "{{task}}"]) or pass a command'
        )
    task = request.task or ""
    command = tuple(arg.replace("{task}", task) for arg in agent_type.command)
    if shutil.which(command[0]) is None:
        raise LaunchError(
            f"executable {command[0]!r} of {key} not found: install it or set {key} "
            f"in {config_file}"
        )
    return command


@dataclass(frozen=True, slots=True)
class Refusal:
    """A launch that must not go ahead: it does not fit the host's budget (now, or ever)."""

    agent_type: str
    request_mb: float
    message: str
    owner_uid: int | None = None

    def alert(self, subprocess_id: str, system_memory: Mapping[str, float]) -> AlertEvent:
        return AlertEvent(
            kind=AlertKind.LAUNCH_REFUSED,
            subprocess_id=subprocess_id,
            agent_type=self.agent_type,
            pid=None,
            current_mb=0.0,
            threshold_mb=self.request_mb,
            message=self.message,
            system_memory=system_memory,
            reason=EndReason.STOPPED,
            owner_uid=self.owner_uid,
        )


def spec_for(
    config: Config,
    request: LaunchRequest,
    subprocess_id: str,
    command: tuple[str, ...],
    log_path: Path,
    cgroup: AgentCgroup | None,
    run_env: Mapping[str, str] | None = None,
    banner: str | None = None,
) -> LaunchSpec:
    """``run_env``: what the daemon tells this run of itself (its number, its session),
    over everything else; ``banner``: the line the agent's log gets before its output."""
    agent_type = config.agent_type(request.agent_type)
    return LaunchSpec(
        subprocess_id=subprocess_id,
        agent_type=request.agent_type,
        command=command,
        log_path=log_path,
        cwd=request.cwd or agent_type.cwd,
        env={
            **base_environment(request.user),
            **agent_type.env,
            **request.env,
            **(run_env or {}),
        },
        user=request.user,
        cgroup=cgroup,
        banner=banner,
    )


def base_environment(user: Credentials | None) -> dict[str, str]:
    """What an agent's environment starts from, before its type's ``env`` and the request's.

    The daemon's own for an agent run as the daemon's user. One run as another user gets what
    their login would, no more: the daemon's variables are root's (HOME, CLAUDE_PM_HOME, tokens),
    and their agent must neither read them nor write into root's home by following them.
    """
    if user is None:
        return dict(os.environ)
    try:
        entry = pwd.getpwuid(user.uid)
    except KeyError:
        # No passwd entry: no name or shell to give; "/" is what login tools fall back to.
        return {"HOME": "/", "PATH": USER_PATH}
    return {
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "SHELL": entry.pw_shell or "/bin/sh",
        "PATH": USER_PATH,
    }
