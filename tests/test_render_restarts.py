"""The CLI's lines for restarts: events, records, the agents table and one agent's view.

The dicts are the daemon's own: events and records from the core's event objects, rows as
``status`` and ``stats`` answer them, with and without the run figures (an older daemon's).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from supervisord.cli import render
from supervisord.core.events import MemoryStats
from tests import typed_events as ev

SID = "claude_3f9a0c12b7de"


def row(sid: str = SID, **figures: Any) -> dict[str, Any]:
    """A ``status`` row (``Agent.row``); ``figures`` adds the run figures of a newer daemon."""
    return {
        "subprocess_id": sid,
        "agent_type": sid.split("_")[0],
        "pid": 4712,
        "current_mb": 212.4,
        "peak_mb": 250.0,
        "level": "OK",
        "status": "OK",
        "ending": None,
        "process_count": 3,
        "duration_seconds": 41.2,
        "max_mb": 2048.0,
        **figures,
    }


def stats(**figures: Any) -> dict[str, Any]:
    """One agent's ``stats`` (``Agent.stats``, its memory figures and limits)."""
    return {
        **row(**figures),
        "command": ["claude", "-p", "fix the build"],
        "measured": "working_set",
        "rss_mb": 230.1,
        "working_set_mb": 212.4,
        "limits": {"warning_mb": 1024.0, "critical_mb": 1536.0, "max_mb": 2048.0},
        "warnings": [],
    }


def exit_record(run: int, next_restart_s: float | None) -> dict[str, Any]:
    memory = MemoryStats(40.0, 2100.5, 2050.0, 41.2, ("memory_critical",), aborted=True)
    event = ev.exit_(SID, "memory_limit", run=run, next_restart_s=next_restart_s)
    return replace(event, memory=memory, signal="SIGTERM").record()


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (
            ev.restart("restarting", SID, run=2, delay_s=0.8, exit_code=143),
            f"RESTART  {SID} restarting: 2nd run ended (memory_limit, exit 143): run 3 in 0.8 s",
        ),
        (
            ev.restart("restarting", SID, run=1, reason="exited", delay_s=32.0, exit_code=1),
            f"RESTART  {SID} restarting: 1st run ended (exited, exit 1): run 2 in 32 s",
        ),
        (
            ev.restart("restarted", SID, run=3),
            f"RESTART  {SID} restarted: run 3 started, pid 4714 (the 2nd ended: memory_limit)",
        ),
        (
            ev.restart("restarted", SID, run=12, reason="restart"),
            f"RESTART  {SID} restarted: run 12 started, pid 4723 (asked by claude-pm restart)",
        ),
        (
            replace(
                ev.restart("restart_limit", SID, run=5, reason="exited", exit_code=1),
                message=f"{SID} failed: 5 runs started within 300 s (restart_limit = 5): not "
                "restarted again",
            ),
            f"FAILED   {SID} restart_limit: 5th run ended (exited, exit 1); failed: 5 runs "
            "started within 300 s (restart_limit = 5): not restarted again",
        ),
        (
            replace(ev.restart("restart_limit", SID, run=2, reason="timeout"), message=""),
            f"FAILED   {SID} restart_limit: 2nd run ended (timeout); no more runs",
        ),
    ],
)
def test_restart_events_read_as_lines(event: Any, line: str) -> None:
    wire = event.as_dict()
    assert render.event(wire) == f"{wire['timestamp']} {line}"


def test_the_restart_limit_alert_is_an_alert_line_and_its_event_is_not() -> None:
    alert = ev.alert("restart_limit", SID).as_dict()
    assert render.event(alert).startswith(f"{alert['timestamp']} CRITICAL {SID} restart_limit: ")
    limit = ev.restart("restart_limit", SID, run=5, reason="exited").as_dict()
    assert " FAILED   " in render.event(limit)


def test_records_name_the_run_and_the_next_one() -> None:
    head = (
        f"{SID} ended: memory_limit (signal SIGTERM); peak 2100.5 MB, end 2050.0 MB, 41.2 s, "
        "aborted"
    )
    assert render.record(exit_record(1, None)) == head  # an agent without restarts
    assert render.record(exit_record(1, 0.8)) == f"{head}; next run in 0.8 s"
    assert render.record(exit_record(3, 12.5)) == f"{head}; run 3 (restarts 2), next run in 12 s"
    assert render.record(exit_record(5, None)) == f"{head}; run 5 (restarts 4)"  # the last
    # `claude-pm stop` between runs answers with the last run's record, saying so.
    stopped = {**exit_record(2, 4.0), "next_restart_s": None, "restart_cancelled": True}
    assert render.record(stopped) == f"{head}; run 2 (restarts 1), restarts cancelled"
    # A record from before restart policies has none of the figures.
    old = {k: v for k, v in exit_record(1, None).items() if k not in render.RUN_FIGURES}
    assert render.record(old) == head
    exit_line = render.event(ev.exit_(SID, "exited", run=2, next_restart_s=1.0).as_dict())
    assert exit_line.endswith("; run 2 (restarts 1), next run in 1.0 s")
    assert " EXIT     " in exit_line


def test_the_agents_table_has_restarts_only_from_a_daemon_that_counts_them() -> None:
    other = "qa_0123456789ab"
    table = render.agents_table([row(run=3, restarts=2), row(other, run=1, restarts=0)])
    header, first, second = table.splitlines()
    assert header.split() == [
        *("SUBPROCESS_ID", "PID", "PROCS", "MB", "PEAK", "LEVEL", "AGE", "MAX_MB", "RESTARTS")
    ]
    assert first.split() == [SID, "4712", "3", "212.4", "250.0", "OK", "41s", "2048", "2"]
    assert second.split()[-1] == "0"
    assert first[header.index("RESTARTS") :] == "2"  # under its header
    # An older daemon's rows: the table as it was; a mixed list shows "-" for the old row.
    old = render.agents_table([row(), row(other)])
    assert "RESTARTS" not in old
    assert old.splitlines()[1].split()[-1] == "2048"
    mixed = render.agents_table([row(run=2, restarts=1), row(other)])
    assert mixed.splitlines()[2].split()[-1] == "-"


def test_one_agents_view_folds_the_run_figures_into_one_line() -> None:
    view = render.agent(stats(run=3, restarts=2)).splitlines()
    assert "run: 3 (restarts 2)" in view
    assert not [line for line in view if line.startswith(("restarts:", "next_restart_s:"))]
    assert view.index("run: 3 (restarts 2)") == view.index(render.memory_figures(stats())) + 1
    waiting = render.agent(stats(run=1, restarts=0, next_restart_s=0.8)).splitlines()
    assert "run: 1 (restarts 0), next run in 0.8 s" in waiting
    old = render.agent(stats()).splitlines()
    assert not [line for line in old if line.startswith("run:")]
    assert old[-1].startswith("limits: warning_mb=1024.0")
