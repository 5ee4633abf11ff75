"""The MCP resources, and the daemon's events relayed as their change notifications.

``claude-pm://alerts`` (the alerts log's tail), ``claude-pm://agents`` (the listing) and
``claude-pm://agents/{subprocess_id}/stats`` (one agent's stats, or its final record once
it has ended). A client listening (``subscriptions/listen``) is told a resource changed on
each daemon event that changes it: an alert, a launch, an exit, a restart. Samples between
events are not announced; reading the resource again gives the figures of the moment.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus

from supervisord.core.errors import SupervisordError
from supervisord.core.kinds import EventType
from supervisord.mcpserver import records
from supervisord.mcpserver.daemon import Daemon

ALERTS_URI = "claude-pm://alerts"
AGENTS_URI = "claude-pm://agents"
STATS_URI = "claude-pm://agents/{subprocess_id}/stats"
ALERTS_SHOWN = 100
# Between attempts to subscribe again after the daemon went away (it is never started here:
# a daemon someone shut down comes back only when a tool needs it).
RESUBSCRIBE_S = 1.0
# Events that change the listing (an agent came, went, or waits).
LISTING_EVENTS = {
    EventType.LAUNCH,
    EventType.EXIT,
    EventType.QUEUED,
    EventType.ADMITTED,
    EventType.CANCELLED,
    EventType.RESTARTING,
    EventType.RESTARTED,
}
log = logging.getLogger(__name__)


def register(server: MCPServer, daemon: Daemon) -> None:
    @server.resource(
        ALERTS_URI,
        name="alerts",
        description=f"The newest {ALERTS_SHOWN} memory alerts, one JSON object a line.",
        mime_type="application/x-ndjson",
    )
    async def alerts() -> str:
        found = await anyio.to_thread.run_sync(
            records.recent_alerts, daemon.home.alerts_log, ALERTS_SHOWN, None, None
        )
        return "".join(json.dumps(alert) + "\n" for alert in found["alerts"])

    @server.resource(
        AGENTS_URI,
        name="agents",
        description="Your agents: running, queued, between restarts, waiting (JSON).",
        mime_type="application/json",
    )
    async def agents() -> str:
        return _json(await _read(daemon, "status"))

    @server.resource(
        STATS_URI,
        name="agent-stats",
        description="One agent's statistics while it runs; its final stats record once ended.",
        mime_type="application/json",
    )
    async def agent_stats(subprocess_id: str) -> str:
        try:
            now = await records.whereabouts(daemon, subprocess_id)
        except ToolError as exc:
            raise ResourceError(str(exc)) from exc
        if now is not None:
            return _json({"state": now[0], **now[1]})
        record = await anyio.to_thread.run_sync(
            records.last_record, daemon.home.stats_log, subprocess_id
        )
        if record is None:
            raise ResourceNotFoundError(f"no agent {subprocess_id!r}, running or recorded")
        return _json({"state": "ended", **record})


async def _read(daemon: Daemon, cmd: str) -> Any:
    try:
        return await daemon.request(cmd)
    except ToolError as exc:
        raise ResourceError(str(exc)) from exc


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def changed(event: dict[str, Any]) -> list[ResourceUpdated]:
    """The resources a daemon event changes."""
    kind = event.get("type")
    subprocess_id = event.get("subprocess_id")
    updates = []
    if kind == EventType.ALERT:
        updates.append(ResourceUpdated(uri=ALERTS_URI))
    if kind in LISTING_EVENTS:
        updates.append(ResourceUpdated(uri=AGENTS_URI))
    if isinstance(subprocess_id, str):
        updates.append(ResourceUpdated(uri=STATS_URI.format(subprocess_id=subprocess_id)))
    return updates


async def relay(daemon: Daemon, bus: SubscriptionBus) -> None:
    """Forever: the daemon's events, published on ``bus`` as resource changes."""
    while True:
        try:
            async with daemon.connected(start=False) as client:
                async for event in await client.subscribe():
                    for update in changed(event):
                        await bus.publish(update)
        except (SupervisordError, OSError) as exc:
            log.info("daemon events unavailable (%s); trying again", exc)
        except Exception:
            # Notifications are a convenience: whatever breaks them must not end the server
            # (this task shares its task group), so it is logged and the relay starts over.
            log.exception("relaying the daemon's events failed; trying again")
        await anyio.sleep(RESUBSCRIBE_S)
