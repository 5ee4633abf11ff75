"""Where an agent is now, what it left behind, and waiting for its end: what ``wait_agent``,
``agent_log`` and the stats resources read, from the daemon and from the home's logs.

The log readers are plain functions that read up to megabytes: callers on the event loop run
them in a worker thread, so one big read does not hold up every other call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver.exceptions import ToolError

from supervisord.core.errors import DaemonNotRunning, ErrorCode, SupervisordError
from supervisord.core.kinds import EventType
from supervisord.host.tail import last_lines, tail_records
from supervisord.mcpserver.daemon import Daemon, tool_error

# How far back the stats log is searched for an ended agent's record: thousands of records.
RECORD_TAIL_BYTES = 8 * 1024 * 1024
# agent_log's bound: a model's context is no place for megabytes of output.
LOG_TAIL_BYTES = 256 * 1024
# The queue listing's sections that hold an agent between or before its runs.
WAITING_SECTIONS = ("queue", "restarting", "waiting")


async def whereabouts(daemon: Daemon, subprocess_id: str) -> tuple[str, dict[str, Any]] | None:
    """("running", its stats) or (the queue section it waits in, its row); None when the
    daemon has no such agent (ended, or never was) for the caller."""
    stats = await daemon.find("stats", subprocess_id=subprocess_id)
    if stats is not None:
        return "running", dict(stats)
    listing = await daemon.request("queue")
    for section in WAITING_SECTIONS:
        for row in listing.get(section, []):
            if row.get("subprocess_id") == subprocess_id:
                return section, dict(row)
    return None


def last_record(stats_log: Path, subprocess_id: str) -> dict[str, Any] | None:
    """The newest stats record of ``subprocess_id`` (the record of its last run)."""
    found = None
    for record in tail_records(stats_log, RECORD_TAIL_BYTES):
        if record.get("subprocess_id") == subprocess_id:
            found = record
    return found


def _final(event: dict[str, Any], subprocess_id: str) -> bool:
    """Whether ``event`` ends the agent for good: no requeue and no next run follow."""
    if event.get("subprocess_id") != subprocess_id:
        return False
    if event.get("type") == EventType.CANCELLED:
        return True
    return not event.get("requeued") and event.get("next_restart_s") is None


async def wait_for_end(daemon: Daemon, subprocess_id: str, timeout_s: float) -> dict[str, Any]:
    """The agent's final stats record once it has ended (``ended``: true), or, after
    ``timeout_s``, where it is and its current stats (``ended``: false)."""
    try:
        async with daemon.connected() as watcher:
            # Subscribed before looking, so an exit between the two cannot slip by.
            events = await watcher.subscribe(types=[EventType.EXIT, EventType.CANCELLED])
            if await whereabouts(daemon, subprocess_id) is None:
                return await _ended_before(daemon, subprocess_id)
            with anyio.move_on_after(timeout_s):
                async for event in events:
                    if _final(event, subprocess_id):
                        return {"ended": True, "record": event}
                raise DaemonNotRunning("the daemon went away while the agent was waited for")
    except (SupervisordError, OSError) as exc:
        raise tool_error(exc) from exc
    now = await whereabouts(daemon, subprocess_id)
    if now is None:  # It ended just as the wait ran out.
        return await _ended_before(daemon, subprocess_id)
    state, stats = now
    return {"ended": False, "waited_s": timeout_s, "state": state, "stats": stats}


async def _ended_before(daemon: Daemon, subprocess_id: str) -> dict[str, Any]:
    record = await anyio.to_thread.run_sync(last_record, daemon.home.stats_log, subprocess_id)
    if record is None:
        raise ToolError(
            f"{ErrorCode.NOT_FOUND}: no agent {subprocess_id!r} is running or waiting, "
            f"and {daemon.home.stats_log} has no record of it"
        )
    return {"ended": True, "record": record}


def log_tail(path: Path, subprocess_id: str, lines: int) -> dict[str, Any]:
    """The last ``lines`` lines of an agent's output log, within :data:`LOG_TAIL_BYTES`."""
    try:
        tail, earlier = last_lines(path, lines, LOG_TAIL_BYTES)
    except FileNotFoundError:
        raise ToolError(
            f"{ErrorCode.NOT_FOUND}: no output log for {subprocess_id!r} at {path}"
        ) from None
    except OSError as exc:
        raise ToolError(f"{ErrorCode.ERROR}: cannot read {path}: {exc.strerror or exc}") from None
    return {
        "subprocess_id": subprocess_id,
        "path": str(path),
        "lines": len(tail),
        "earlier_lines_omitted": earlier,
        "text": "\n".join(tail),
    }


def recent_alerts(
    alerts_log: Path, count: int, level: str | None, subprocess_id: str | None
) -> dict[str, Any]:
    """The newest ``count`` alert records that match, oldest first."""
    matching = [
        record
        for record in tail_records(alerts_log, RECORD_TAIL_BYTES)
        if (level is None or record.get("level") == level)
        and (subprocess_id is None or record.get("subprocess_id") == subprocess_id)
    ]
    return {"alerts": matching[-count:], "count": len(matching[-count:]), "log": str(alerts_log)}
