"""Events of the stream for tests that feed observers directly (metrics, webhooks, top)."""

from __future__ import annotations

from datetime import UTC, datetime

from supervisord.core.events import AlertEvent, ExitEvent, LaunchEvent, MemoryStats, RestartEvent
from supervisord.core.kinds import AlertKind, EndReason, EventType

AT = datetime(2026, 11, 26, 13, 3, 7, 512000, tzinfo=UTC)
SYSTEM_MEMORY = {
    "total_mb": 1000.0,
    "available_mb": 385.0,
    "used_mb": 615.0,
    "percent": 61.5,
    "free_mb": 100.0,
}


def alert(
    kind: str, sid: str = "hog_0123456789ab", *, crossed_to_term_s: float | None = None
) -> AlertEvent:
    return AlertEvent(
        kind=AlertKind(kind),
        subprocess_id=sid,
        agent_type=sid.split("_")[0],
        pid=4711,
        current_mb=210.5,
        threshold_mb=200,
        message=f"{kind}: memory 210.5 MB exceeds 200 MB",
        system_memory=SYSTEM_MEMORY,
        crossed_to_term_s=crossed_to_term_s,
        at=AT,
    )


def exit_(
    sid: str,
    reason: str = "exited",
    *,
    agent_type: str | None = None,
    term_to_gone_s: float | None = None,
    run: int = 1,
    next_restart_s: float | None = None,
) -> ExitEvent:
    why = EndReason(reason)
    stats = MemoryStats(0.0, 1.0, 1.0, 1.0, (), aborted=why.aborted)
    return ExitEvent(
        subprocess_id=sid,
        agent_type=agent_type or sid.split("_")[0],
        pid=4711,
        command=("true",),
        exit_code=0 if why is EndReason.EXITED else None,
        signal=None,
        reason=why,
        memory=stats,
        term_to_gone_s=term_to_gone_s,
        at=AT,
        run=run,
        next_restart_s=next_restart_s,
    )


def launch(sid: str, agent_type: str | None = None) -> LaunchEvent:
    agent_type = agent_type or sid.split("_")[0]
    return LaunchEvent(sid, agent_type, 4711, {"subprocess_id": sid, "agent_type": agent_type})


def restart(
    kind: str,
    sid: str = "hog_0123456789ab",
    *,
    run: int = 1,
    reason: str = "memory_limit",
    delay_s: float | None = None,
    exit_code: int | None = None,
) -> RestartEvent:
    """A restart event as the supervisor makes it (its messages too): ``restarting`` and
    ``restart_limit`` name the run that ended, ``restarted`` the new run and its pid."""
    type_ = EventType(kind)
    pid = 4711 + run if type_ is EventType.RESTARTED else None
    if type_ is EventType.RESTARTING:
        message = f"run {run} ended ({reason}): run {run + 1} in {delay_s or 0:.2f} s"
    elif pid is not None:
        message = f"run {run} started (pid {pid})"
    else:
        limit = f"{run} runs started within 300 s (restart_limit = {run})"
        message = f"{sid} failed: {limit}: not restarted again"
    return RestartEvent(
        type=type_,
        subprocess_id=sid,
        agent_type=sid.split("_")[0],
        run=run,
        reason=reason,
        message=message,
        delay_s=delay_s if type_ is EventType.RESTARTING else None,
        pid=pid,
        exit_code=exit_code,
        at=AT,
    )
