"""``claude-pm mcp``: the supervisor as an MCP server over stdio, on the official SDK.

It runs as the calling user and reaches the daemon through the project's client, so the
daemon authorises each request exactly as it would the user's own CLI. Standard output is
the protocol's: nothing else may write there (the SDK logs to standard error).
"""

from __future__ import annotations

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import InMemorySubscriptionBus, SubscriptionBus

from supervisord import __version__
from supervisord.config.home import Home
from supervisord.mcpserver import resources, tools
from supervisord.mcpserver.daemon import Daemon

INSTRUCTIONS = (
    "claude-pm supervises agent processes: each runs with memory limits on its whole "
    "process tree (warned, then stopped at max_mb), inside a memory budget for the host. "
    "Start sub-agents with launch_agent, follow them with list_agents, agent_stats and "
    "agent_log, collect their result with wait_agent, end them with stop_agent or "
    "kill_agent. Memory figures are MB; durations are seconds."
)


def build(daemon: Daemon, bus: SubscriptionBus) -> MCPServer:
    server = MCPServer(
        "claude-pm",
        title="claude-pm supervisor",
        version=__version__,
        instructions=INSTRUCTIONS,
        subscriptions=bus,
        log_level="WARNING",
    )
    tools.register(server, daemon)
    resources.register(server, daemon)
    return server


async def serve(home: Home) -> None:
    """Until the client closes our standard input."""
    daemon = Daemon(home)
    bus = InMemorySubscriptionBus()
    server = build(daemon, bus)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_start_then_relay, daemon, bus)
        await server.run_stdio_async()
        tg.cancel_scope.cancel()


async def _start_then_relay(daemon: Daemon, bus: SubscriptionBus) -> None:
    try:
        await daemon.ensure_running()
    except Exception as exc:
        # Said on stderr, and by each tool call again: the server serves on regardless (this
        # task shares its task group, so nothing may escape it).
        resources.log.warning("cannot start the daemon of %s: %s", daemon.home.root, exc)
    await resources.relay(daemon, bus)


def main(home: Home) -> int:
    anyio.run(serve, home)
    return 0
