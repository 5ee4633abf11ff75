"""What each control command does: validated requests in, JSON-serialisable results out."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from contextlib import suppress
from typing import Any, NoReturn, Protocol

import anyio
import structlog

from supervisord import __version__
from supervisord.control import authz
from supervisord.control.authz import Denial
from supervisord.control.peers import Peer
from supervisord.control.protocol import PROTOCOL_VERSION, Request
from supervisord.core.errors import NotFoundError, PermissionDenied, UsageError
from supervisord.core.kinds import EndReason
from supervisord.core.limits import LIMIT_KEYS
from supervisord.core.restart import RESTART_KEYS
from supervisord.core.scheduling import SCHEDULING_KEYS
from supervisord.core.units import MIB
from supervisord.host import sampler, watching
from supervisord.host.launcher import Credentials
from supervisord.host.sysmem import system_memory
from supervisord.supervise.admission import Queued
from supervisord.supervise.agent import Agent
from supervisord.supervise.launchplan import LaunchRequest
from supervisord.supervise.supervisor import Supervisor

log = structlog.get_logger("supervisord.control.commands")


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
        if denial := authz.command_denial(peer.uid, request.cmd):
            _deny(peer, request.cmd, denial)
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
                return self.status(peer)
            case "stats":
                return await self.stats(args, peer)
            case "launch":
                return await self.launch(args, peer)
            case "stop":
                return await self.stop(args["subprocess_id"], args.get("grace_s"), peer)
            case "kill":
                if pending := self._between_runs(args["subprocess_id"], peer, "kill"):
                    return pending
                self._owned(args["subprocess_id"], peer, "kill", "end")
                ended = await self.supervisor.stop(args["subprocess_id"], 0.0, EndReason.STOPPED)
                return ended.record()
            case "restart":
                return await self.restart(args["subprocess_id"], args.get("grace_s"), peer)
            case "watch":
                return await self.watch(args, peer)
            case "run":
                return await self.watch({**args, "pid": peer.pid}, peer, run=tuple(args["command"]))
            case "unwatch":
                self._owned(args["subprocess_id"], peer, "unwatch", "let go of")
                return self.supervisor.unwatch(args["subprocess_id"])
            case "queue":
                return self.queue(peer)
            case "cancel":
                return self.cancel(args["subprocess_id"], peer)
            case "reload":
                return self.daemon.reload(args.get("env"))
            case "shutdown":
                leave = bool(args.get("leave_agents", False))
                count = len(self.supervisor.agents)
                self.daemon.request_shutdown(leave_agents=leave)
                return {"stopping": True, "agents": count, "leave_agents": leave}
        raise UsageError(f"command {request.cmd!r} is not handled here")

    async def stop(self, subprocess_id: str, grace: float | None, peer: Peer) -> dict[str, Any]:
        if grace is not None and grace < 0:
            raise UsageError(f"stop: grace_s must be >= 0, got {grace}")
        if pending := self._between_runs(subprocess_id, peer, "stop"):
            return pending
        agent = self._owned(subprocess_id, peer, "stop", "end")
        if grace is not None and (
            denial := authz.grace_denial(peer.uid, agent.id, grace, agent.limits.term_grace_s)
        ):
            _deny(peer, "stop", denial)
        return (await self.supervisor.stop(agent.id, grace)).record()

    async def restart(self, subprocess_id: str, grace: float | None, peer: Peer) -> dict[str, Any]:
        if grace is not None and grace < 0:
            raise UsageError(f"restart: grace_s must be >= 0, got {grace}")
        self._owner_may(subprocess_id, peer, "restart", "restart")
        if grace is not None and subprocess_id in self.supervisor.agents:
            term_grace = self.supervisor.agents[subprocess_id].limits.term_grace_s
            if denial := authz.grace_denial(peer.uid, subprocess_id, grace, term_grace):
                _deny(peer, "restart", denial)
        return await self.supervisor.restart(subprocess_id, grace)

    async def watch(
        self, args: Mapping[str, Any], peer: Peer, run: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """``watch`` of a pid; ``run``: of the peer itself, about to exec ``run``."""
        if run is not None and not run:
            raise UsageError("run: give the command to run")
        target = watching.look(args["pid"])
        if denial := authz.process_denial(peer.uid, target.pid, target.uid):
            _deny(peer, "watch", denial)
        agent_type = args.get("agent_type") or watching.agent_type_of(target)
        limits = self._limits_of(args, "watch")
        self._check_limits(agent_type, limits, {}, {}, False, peer)
        agent = await self.supervisor.watch(target, agent_type, limits, peer.uid, run=run)
        return {
            "subprocess_id": agent.id,
            "pid": agent.child.pid,
            "agent_type": agent.agent_type,
            "command": list(agent.command),
            "limits": agent.limits.as_dict(),
            "supervised_by": agent.stats(self.supervisor.clock())["supervised_by"],
        }

    def _between_runs(self, subprocess_id: str, peer: Peer, cmd: str) -> dict[str, Any] | None:
        """``stop`` or ``kill`` of an agent whose next run is due: no run comes again."""
        if subprocess_id not in self.supervisor.restarts:
            return None
        self._owner_may(subprocess_id, peer, cmd, "end")
        return self.supervisor.end_restarts(subprocess_id, f"{cmd} from uid {peer.uid}")

    def _owner_may(self, subprocess_id: str, peer: Peer, cmd: str, verb: str) -> None:
        """Refuse ``peer`` unless it may ``verb`` this agent, wherever it is (running,
        waiting, between runs, or lately ended)."""
        owner = self.supervisor.owner_of(subprocess_id)
        if denial := authz.owner_denial(peer.uid, subprocess_id, owner, verb):
            _deny(peer, cmd, denial)

    def _owned(self, subprocess_id: str, peer: Peer, cmd: str, verb: str) -> Agent:
        """The agent, if ``peer`` may ``verb`` it: admins any, users only those they launched."""
        agent = self.supervisor.get(subprocess_id)
        if denial := authz.owner_denial(peer.uid, subprocess_id, agent.owner_uid, verb):
            _deny(peer, cmd, denial)
        return agent

    async def stats(self, args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        now = self.supervisor.clock()
        if "subprocess_id" in args:
            rows = [self._owned(args["subprocess_id"], peer, "stats", "see").stats(now)]
        else:
            rows = [a.stats(now) for a in self._visible(peer)]
        if args.get("pss"):
            # Seconds for a big tree: in a worker thread, so that sampling goes on meanwhile.
            await anyio.to_thread.run_sync(_add_pss, rows)
        return rows[0] if "subprocess_id" in args else {"agents": rows}

    def _visible(self, peer: Peer) -> list[Agent]:
        owner = authz.owner_filter(peer.uid)
        agents = self.supervisor.agents.values()
        return [a for a in agents if owner is None or a.owner_uid == owner]

    def status(self, peer: Peer) -> dict[str, Any]:
        now = self.supervisor.clock()
        config = self.supervisor.config
        enabled = config.limits.enabled
        visible = self._visible(peer)
        return {
            "daemon": self.daemon.info(),
            "config": config.public(),
            "monitoring": "enabled" if enabled else "disabled (CLAUDE_PM_DISABLE_MEMORY_MONITOR)",
            "cgroups": self.supervisor.cgroup_status,
            "sampling": self.supervisor.sampling(),
            "system_memory": system_memory().as_dict(),
            "host": self.supervisor.host_status(),
            "agent_count": len(visible),
            # Compact rows: status stays fast with hundreds of agents; stats has the detail.
            "agents": [a.row(now) for a in visible],
            **self._waiting_rows(peer),
            "failed": self.supervisor.dependencies.failed(authz.owner_filter(peer.uid)),
        }

    def _waiting_rows(self, peer: Peer) -> dict[str, list[dict[str, Any]]]:
        """Agents between runs, and launches waiting for others."""
        owner = authz.owner_filter(peer.uid)
        supervisor = self.supervisor
        return {
            "restarting": supervisor.restarts.rows(supervisor.clock(), owner),
            "waiting": supervisor.dependencies.rows(owner),
        }

    def _limits_of(self, args: Mapping[str, Any], cmd: str) -> dict[str, Any]:
        limits = dict(args.get("limits", {}))
        unknown = sorted(set(limits) - LIMIT_KEYS)
        if unknown:
            raise UsageError(
                f"{cmd}: unknown limit {unknown[0]!r}; allowed: {', '.join(sorted(LIMIT_KEYS))}"
            )
        if "timeout_s" in args:
            limits["timeout_s"] = args["timeout_s"]
        return limits

    async def launch(self, args: Mapping[str, Any], peer: Peer) -> dict[str, Any]:
        limits = self._limits_of(args, "launch")
        scheduling = {k: args[k] for k in SCHEDULING_KEYS if k in args}
        restart = {k: args[k] for k in RESTART_KEYS if k in args}
        if not args.get("command") and args.get("task") is None:
            raise UsageError('launch: give either "command" (a list) or "task" (a string)')
        self._check_limits(
            args["agent_type"], limits, scheduling, restart, bool(args.get("force", False)), peer
        )
        after = tuple(dict.fromkeys(args.get("after", [])))
        for subprocess_id in after:
            with suppress(NotFoundError):  # said, naming the argument, by the supervisor
                self._owner_may(subprocess_id, peer, "launch", "wait for")
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
            scheduling=scheduling,
            queue=not args.get("no_queue", False),
            restart=restart,
            after=after,
        )
        return self._launched(await self.supervisor.launch(request))

    def _launched(self, started: Agent | Queued) -> dict[str, Any]:
        """The launch's answer: the agent started, or the launch waiting (and why)."""
        if isinstance(started, Queued):
            waiting = started.waiting
            return {
                "subprocess_id": waiting.subprocess_id,
                "queued": True,
                "pid": None,
                "agent_type": waiting.request.agent_type,
                "command": list(waiting.command),
                "log": str(self.supervisor.home.agent_log(waiting.subprocess_id)),
                **waiting.row(started.position),
                "after": list(waiting.request.after),
                "session_uuid": waiting.lineage.session_uuid,
            }
        agent = started
        return {
            "queued": False,
            "subprocess_id": agent.id,
            "pid": agent.child.pid,
            "agent_type": agent.agent_type,
            "command": list(agent.command),
            "limits": agent.limits.as_dict(),
            "log": str(self.supervisor.home.agent_log(agent.id)),
            "request_mb": agent.request_mb,
            "priority": agent.scheduling.priority,
            "restart": agent.restart.restart,
            "session_uuid": agent.lineage.session_uuid,
        }

    def queue(self, peer: Peer) -> dict[str, Any]:
        admission = self.supervisor.admission
        return {
            "queue": admission.rows(authz.owner_filter(peer.uid)),
            "length": len(admission),
            "max_queued": admission.max_queued,
            "host": self.supervisor.host_status(),
            **self._waiting_rows(peer),
        }

    def cancel(self, subprocess_id: str, peer: Peer) -> dict[str, Any]:
        if subprocess_id in self.supervisor.restarts:
            return self._between_runs(subprocess_id, peer, "cancel") or {}
        if subprocess_id not in self.supervisor.dependencies:
            self.supervisor.admission.get(subprocess_id)  # NotFoundError: in no queue
        self._owner_may(subprocess_id, peer, "cancel", "cancel")
        reason = f"cancelled by uid {peer.uid}"
        return self.supervisor.cancel(subprocess_id, reason).row(0) | {"reason": reason}

    def _check_limits(
        self,
        agent_type: str,
        limits: Mapping[str, Any],
        scheduling: Mapping[str, Any],
        restart: Mapping[str, Any],
        force: bool,
        peer: Peer,
    ) -> None:
        """Users may only tighten: their agents share the machine with everyone else's."""
        config = self.supervisor.config
        requested = config.limits_for(agent_type, limits)
        asked = config.scheduling_for(agent_type, scheduling)  # validates, for admins too
        restarts = (config.restart_for(agent_type), config.restart_for(agent_type, restart))
        if authz.is_admin(peer.uid):
            return
        in_force = config.limits_for(agent_type)
        default = config.scheduling_for(agent_type)
        derived = self.supervisor.admission.request_mb(agent_type, default, in_force)
        if denial := authz.launch_denial(
            peer.uid,
            agent_type,
            in_force,
            requested,
            force=force,
            scheduling=(default, asked, derived),
            restarts=restarts,
        ):
            _deny(peer, "launch", denial)


def _deny(peer: Peer, cmd: str, denial: Denial) -> NoReturn:
    # In the daemon log too: a refused attempt is worth an administrator's attention.
    log.warning("auth_denied", uid=peer.uid, pid=peer.pid, cmd=cmd, refused=list(denial.refused))
    raise PermissionDenied(denial.message)


def credentials_for(peer: Peer) -> Credentials | None:
    """A root daemon runs an agent as the user who asked for it, never as root for them."""
    if os.geteuid() != 0 or authz.is_admin(peer.uid):
        return None
    try:
        name = pwd.getpwuid(peer.uid).pw_name
        groups = tuple(os.getgrouplist(name, peer.gid))
    except KeyError:
        groups = ()
    return Credentials(uid=peer.uid, gid=peer.gid, groups=groups)


def _add_pss(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        row["pss_mb"] = round(sampler.pss_bytes(row["tree_pids"]) / MIB, 1)
