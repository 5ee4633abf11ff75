"""The MCP tools: one per thing an orchestrating agent does with its sub-agents.

Each takes typed arguments (the SDK turns the annotations into the input schema and refuses
arguments of the wrong type before a tool runs) and returns the daemon's JSON answer. The
descriptions are written for a model: what the tool does, the units, what an error means.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from supervisord.core.errors import NotFoundError
from supervisord.mcpserver import records
from supervisord.mcpserver.daemon import Daemon

ERRORS = (
    " On failure the result is an error whose text starts with the daemon's code: not_found "
    "(no such agent of yours), permission_denied, bad_request (an argument the daemon "
    "refuses, with what is allowed), launch_failed, launch_refused, queue_full, "
    "daemon_not_running, timeout."
)
LAUNCH = (
    "Start an agent (any program) under the memory supervisor: its whole process tree is "
    "measured every check interval, warned about at warning_mb and critical_mb, and stopped "
    "(SIGTERM, then SIGKILL after grace_s) at max_mb or after timeout_s. Give `command` (argv "
    "list, no shell) or `task` (text for the type's configured command template). Returns "
    "subprocess_id and pid; when the host's memory budget is full it waits in a queue instead "
    "(queued: true, pid: null, position). Limits left out are the type's or the daemon's. "
    "`restart` brings it back after it ended (same subprocess_id; wait_agent waits through "
    "its runs)." + ERRORS
)
# What subprocess ids are made of (TYPE_HEX); never a path, since agent_log builds one from it.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
AgentId = Annotated[
    str,
    Field(
        pattern=ID_PATTERN,
        description="The agent's subprocess_id, as launch_agent returned it.",
    ),
]
SomeAgent = Annotated[str | None, Field(pattern=ID_PATTERN, description="One agent's id.")]
MB = Annotated[float | None, Field(gt=0, description="Megabytes (MiB) of the agent's tree.")]
Seconds = Annotated[float | None, Field(ge=0, description="Seconds.")]
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
ENDS = ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False)


class Restart(BaseModel):
    """When the agent comes back after it ended (keys left out: its type's, or none)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["no", "on-failure", "on-abort", "always"] = Field(
        description="Which ends bring it back; on-abort: ended for memory, time or pressure."
    )
    delay_s: float | None = Field(None, ge=0, description="First delay, seconds.")
    backoff: float | None = Field(None, ge=1, description="Delay factor per quick failure.")
    delay_max_s: float | None = Field(None, ge=0, description="Longest delay, seconds.")
    limit: int | None = Field(None, ge=1, description="Most runs within window_s.")
    window_s: float | None = Field(None, gt=0, description="Seconds.")
    resume_command: list[str] | None = Field(
        None,
        min_length=1,
        description="Argv of each run after the first; {session_uuid}, {session_id} filled in.",
    )
    session_pattern: str | None = Field(
        None, description="Regex with one group: the session id in the agent's output."
    )

    def keys(self) -> dict[str, Any]:
        """As the daemon's launch takes them."""
        values = {
            "restart": self.mode,
            "restart_delay_s": self.delay_s,
            "restart_backoff": self.backoff,
            "restart_delay_max_s": self.delay_max_s,
            "restart_limit": self.limit,
            "restart_window_s": self.window_s,
            "resume_command": self.resume_command,
            "session_pattern": self.session_pattern,
        }
        return {key: value for key, value in values.items() if value is not None}


def register(server: MCPServer, daemon: Daemon) -> None:
    """Add every tool to ``server``, each talking to ``daemon``."""
    _launching(server, daemon)
    _looking(server, daemon)
    _ending(server, daemon)
    _reading(server, daemon)


def _launching(server: MCPServer, daemon: Daemon) -> None:
    # Relative directories are the orchestrator's: this server runs where it was started.
    here = PurePath(os.getcwd())

    @server.tool(
        description=LAUNCH,
        annotations=ToolAnnotations(destructive_hint=False, open_world_hint=False),
    )
    async def launch_agent(
        agent_type: Annotated[
            str,
            Field(min_length=1, description="Type name (e.g. 'claude'); picks [agents.TYPE]."),
        ],
        command: Annotated[
            list[str] | None, Field(min_length=1, description="Program and arguments.")
        ] = None,
        task: Annotated[str | None, Field(description="Task for the type's template.")] = None,
        cwd: Annotated[
            str | None, Field(description="Working directory (default: this server's).")
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra variables.")] = None,
        warning_mb: MB = None,
        critical_mb: MB = None,
        max_mb: MB = None,
        timeout_s: Annotated[float | None, Field(gt=0, description="Seconds to run.")] = None,
        grace_s: Seconds = None,
        restart: Restart | None = None,
        priority: Annotated[int | None, Field(description="Higher: admitted first.")] = None,
        request_mb: MB = None,
        on_pressure: Literal["stop", "requeue"] | None = None,
        queue: Annotated[bool, Field(description="False: refuse rather than wait.")] = True,
        after: Annotated[
            list[str] | None, Field(description="Start once these ids ended with exit 0.")
        ] = None,
    ) -> dict[str, Any]:
        limits = {"warning_mb": warning_mb, "critical_mb": critical_mb, "max_mb": max_mb}
        if grace_s is not None:
            limits["term_grace_s"] = grace_s
        return dict(
            await daemon.request(
                "launch",
                **(restart.keys() if restart else {}),
                agent_type=agent_type,
                command=command,
                task=task,
                cwd=str(here / cwd) if cwd else str(here),
                env=env,
                limits={k: v for k, v in limits.items() if v is not None} or None,
                timeout_s=timeout_s,
                priority=priority,
                request_mb=request_mb,
                on_pressure=on_pressure,
                no_queue=None if queue else True,
                after=after,
            )
        )


def _looking(server: MCPServer, daemon: Daemon) -> None:
    @server.tool(
        description=(
            "List your supervised agents: running ones (subprocess_id, pid, current_mb, "
            "peak_mb, level OK/WARNING/CRITICAL, status, process_count, duration_seconds, "
            "max_mb, run), and those waiting: in the admission queue, between restarts, or "
            "for other agents (after)." + ERRORS
        ),
        annotations=READ_ONLY,
    )
    async def list_agents() -> dict[str, Any]:
        status = await daemon.request("status")
        keys = ("agent_count", "agents", "restarting", "waiting", "failed")
        listing = {key: status.get(key) for key in keys}
        listing["queued"] = (await daemon.request("queue"))["queue"]
        return listing

    @server.tool(
        description=(
            "Detailed statistics of one running agent (or of all, without subprocess_id): "
            "memory in MB (current_mb, peak_mb, rss/pss figures), tree_pids, warnings, "
            "limits, growth projection, run and restarts. pss: true adds each tree's PSS "
            "(slower)." + ERRORS
        ),
        annotations=READ_ONLY,
    )
    async def agent_stats(subprocess_id: SomeAgent = None, pss: bool = False) -> dict[str, Any]:
        return dict(await daemon.request("stats", subprocess_id=subprocess_id, pss=pss or None))

    @server.tool(
        description=(
            "The host's memory in MB (total_mb, available_mb, used_mb, percent) and the "
            "supervisor's budget for all agents together (host: budget_mb, reserve_mb, "
            "used_mb, held_mb = used or requested, free_mb, shedding, queue_length), with the "
            "launches waiting for room (queue) or for their next run (restarting)." + ERRORS
        ),
        annotations=READ_ONLY,
    )
    async def host_memory() -> dict[str, Any]:
        status = await daemon.request("status")
        queue = await daemon.request("queue")
        return {
            "system_memory": status["system_memory"],
            "host": status["host"],
            "queue": queue["queue"],
            "restarting": queue.get("restarting", []),
        }


def _ending(server: MCPServer, daemon: Daemon) -> None:
    @server.tool(
        description=(
            "Stop an agent: SIGTERM to its whole process tree, SIGKILL to what remains after "
            "grace_s (default: its limits' grace). Returns its final stats record. A launch "
            "still waiting in the queue is cancelled instead." + ERRORS
        ),
        annotations=ENDS,
    )
    async def stop_agent(subprocess_id: AgentId, grace_s: Seconds = None) -> dict[str, Any]:
        try:
            return dict(await daemon.request("stop", subprocess_id=subprocess_id, grace_s=grace_s))
        except ToolError as exc:
            if not isinstance(exc.__cause__, NotFoundError):
                raise
            cancelled = await daemon.find("cancel", subprocess_id=subprocess_id)
            if cancelled is None:
                raise  # the daemon's own words: no agent of that id
            return dict(cancelled)

    @server.tool(
        description="SIGKILL an agent's whole process tree now; returns its stats record." + ERRORS,
        annotations=ENDS,
    )
    async def kill_agent(subprocess_id: AgentId) -> dict[str, Any]:
        return dict(await daemon.request("kill", subprocess_id=subprocess_id))

    @server.tool(
        description=(
            "End an agent's current run (SIGTERM, SIGKILL after grace_s) and start its next "
            "run now, with the same subprocess_id (resuming its session where its type "
            "configures a resume_command)." + ERRORS
        ),
        annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False),
    )
    async def restart_agent(subprocess_id: AgentId, grace_s: Seconds = None) -> dict[str, Any]:
        return dict(await daemon.request("restart", subprocess_id=subprocess_id, grace_s=grace_s))


def _reading(server: MCPServer, daemon: Daemon) -> None:
    @server.tool(
        description=(
            "Wait until an agent has ended for good (through its queue wait and restarts), "
            "at most timeout_s seconds. Returns ended: true with its final stats record "
            "(reason: exited, memory_limit, timeout, stopped, killed, ...; exit_code; "
            "memory_stats with peak_mb), or ended: false with where it is and its current "
            "stats when the time ran out. An agent that already ended returns its record." + ERRORS
        ),
        annotations=READ_ONLY,
    )
    async def wait_agent(
        subprocess_id: AgentId,
        timeout_s: Annotated[float, Field(gt=0, le=3600, description="Seconds.")] = 60.0,
    ) -> dict[str, Any]:
        return await records.wait_for_end(daemon, subprocess_id, timeout_s)

    @server.tool(
        description=(
            "The last lines of an agent's output (its stdout and stderr, one log through its "
            "restarts), at most 2000 lines and 256 KiB. earlier_lines_omitted tells whether "
            "the log holds more before them." + ERRORS
        ),
        annotations=READ_ONLY,
    )
    async def agent_log(
        subprocess_id: AgentId,
        lines: Annotated[int, Field(ge=1, le=2000, description="How many lines.")] = 50,
    ) -> dict[str, Any]:
        path = daemon.home.agent_log(subprocess_id)
        return await anyio.to_thread.run_sync(records.log_tail, path, subprocess_id, lines)

    @server.tool(
        description=(
            "The newest memory alerts (oldest first): warnings, critical levels, SIGTERM and "
            "SIGKILL sent, timeouts, restarts, host pressure; each with timestamp, level, "
            "event, subprocess_id, current_mb and available_mb."
        ),
        annotations=READ_ONLY,
    )
    async def recent_alerts(
        count: Annotated[int, Field(ge=1, le=500, description="How many alerts.")] = 20,
        level: Literal["WARNING", "CRITICAL"] | None = None,
        subprocess_id: SomeAgent = None,
    ) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(
            records.recent_alerts, daemon.home.alerts_log, count, level, subprocess_id
        )
