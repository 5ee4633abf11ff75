"""What each control command does: validated requests in, JSON-serialisable results out."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from typing import Any, Protocol

from supervisord import __version__
from supervisord.control.peers import Peer
from supervisord.control.protocol import PROTOCOL_VERSION, Request
from supervisord.core.errors import PermissionDenied, UsageError
from supervisord.core.kinds import EndReason
from supervisord.core.limits import LIMIT_KEYS
from supervisord.host.launcher import Credentials
from supervisord.host.sysmem import system_memory
from supervisord.supervise.launchplan import LaunchRequest
from supervisord.supervise.supervisor import Supervisor


class DaemonControl(Protocol):
    """What commands need from the daemon around the supervisor."""

    def info(self) -> dict[str, Any]: ...

    def reload(self, env: Mapping[str, str] | None) -> dict[str, Any]: ...

    def request_shutdown(self, *, leave_agents: bool) -> None: ...


class Commands:
    def __init__(self, supervisor: Supervisor, daemon: DaemonControl) -> None:
        self.supervisor = supervisor
        self.daemon = daemon

    async def handle(self, request: Request, peer: Peer) -> Any:
        args = request.args
        match request.cmd:
            case "hello":
                return {
                    "protocol": PROTOCOL_VERSION,
                    "version": __version__,
                    "pid": os.getpid(),
                    "peer_uid": peer.uid,
                }
            case "ping":
                return {"pong": True}
            case "status":
                return self.status()
            case "stats":
                if "subprocess_id" in args:
                    agent = self.supervisor.get(args["subprocess_id"])
                    return agent.stats(self.supervisor.clock())
                return {"agents": self.supervisor.stats()}
            case "launch":
                return await self.launch(args, peer)
            case "stop":
                grace = args.get("grace_s")
                if grace is not None and grace < 0:
                    raise UsageError(f"stop: grace_s must be >= 0, got {grace}")
                self._check_owner(args["subprocess_id"], peer)
                return (await self.supervisor.stop(args["subprocess_id"], grace)).record()
            case "kill":
                self._check_owner(args["subprocess_id"], peer)
                ended = await self.supervisor.stop(args["subprocess_id"], 0.0, EndReason.STOPPED)
                return ended.record()
            case "reload":
                return self.daemon.reload(args.get("env"))
            case "shutdown":
                leave = bool(args.get("leave_agents", False))
                count = len(self.supervisor.agents)
                self.daemon.request_shutdown(leave_agents=leave)
                return {"stopping": True, "agents": count, "leave_agents": leave}
        raise UsageError(f"command {request.cmd!r} is not handled here")

    def _check_owner(self, subprocess_id: str, peer: Peer) -> None:
        """Root and the daemon's own user may end any agent; others only those they launched."""
        agent = self.supervisor.get(subprocess_id)
        if peer.uid in (0, os.geteuid()) or agent.owner_uid == peer.uid:
            return
        raise PermissionDenied(
            f"uid {peer.uid} may not end {subprocess_id}: it was launched by uid {agent.owner_uid}"
        )

    def status(self) -> dict[str, Any]:
        now = self.supervisor.clock()
        config = self.supervisor.config
        enabled = config.limits.enabled
        return {
            "daemon": self.daemon.info(),
            "config": config.public(),
            "monitoring": "enabled" if enabled else "disabled (CLAUDE_PM_DISABLE_MEMORY_MONITOR)",
            "cgroups": self.supervisor.cgroup_status,
            "sampling": self.supervisor.sampling(),
            "system_memory": system_memory().as_dict(),
            "agent_count": len(self.supervisor.agents),
            # Compact rows: status stays fast with hundreds of agents; stats has the detail.
            "agents": [a.row(now) for a in self.supervisor.agents.values()],
        }

    async def launch(self, args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        limits = dict(args.get("limits", {}))
        unknown = sorted(set(limits) - LIMIT_KEYS)
        if unknown:
            raise UsageError(
                f"launch: unknown limit {unknown[0]!r}; allowed: {', '.join(sorted(LIMIT_KEYS))}"
            )
        if "timeout_s" in args:
            limits["timeout_s"] = args["timeout_s"]
        if not args.get("command") and args.get("task") is None:
            raise UsageError('launch: give either "command" (a list) or "task" (a string)')
        request = LaunchRequest(
            agent_type=args["agent_type"],
            command=tuple(args["command"]) if args.get("command") else None,
            task=args.get("task"),
            cwd=args.get("cwd"),
            env=dict(args.get("env", {})),
            limits=limits,
            force=bool(args.get("force", False)),
            user=credentials_for(peer),
            owner_uid=peer.uid,
        )
        agent = await self.supervisor.launch(request)
        return {
            "subprocess_id": agent.id,
            "pid": agent.child.pid,
            "agent_type": agent.agent_type,
            "command": list(agent.command),
            "limits": agent.limits.as_dict(),
            "log": str(self.supervisor.home.agent_log(agent.id)),
        }


def credentials_for(peer: Peer) -> Credentials | None:
    """A root daemon runs an agent as the user who asked for it, never as root for them."""
    if os.geteuid() != 0 or peer.uid in (0, os.geteuid()):
        return None
    try:
        name = pwd.getpwuid(peer.uid).pw_name
        groups = tuple(os.getgrouplist(name, peer.gid))
    except KeyError:
        groups = ()
    return Credentials(uid=peer.uid, gid=peer.gid, groups=groups)
