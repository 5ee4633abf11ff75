"""``claude-pm top``: the pure layout, and the real thing in tmux reading a real daemon."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

from supervisord.observe.top import (
    SPARKS,
    AgentView,
    TopModel,
    growth,
    megabytes,
    render,
    sparkline,
    time_to_limit,
)
from tests.conftest import DaemonProcess, require_tool, simagent

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


def stats(sid: str, mb: float, level: str = "OK", **kw: Any) -> dict[str, Any]:
    return {
        "subprocess_id": sid,
        "agent_type": sid.split("_")[0],
        "current_mb": mb,
        "peak_mb": mb,
        "level": level,
        "status": level,
        "process_count": 2,
        "ending": None,
        "limits": {"max_mb": 200.0},
        **kw,
    }


def screen(model: TopModel, width: int = 80, height: int = 24) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=width, height=height, color_system=None, legacy_windows=False)
    console.print(render(model, width, height))
    return out.getvalue().splitlines()


def test_sparkline_growth_and_time_to_limit_come_from_the_daemon() -> None:
    assert sparkline([], 10) == ""
    assert sparkline([5.0, 5.2, 5.1], 10) == SPARKS[0] * 3  # flat within noise
    assert sparkline([0, 50, 100], 10) == SPARKS[0] + SPARKS[4] + SPARKS[-1]
    assert sparkline(list(range(100)), 8) == sparkline(list(range(92, 100)), 8)
    view = AgentView("eng_aaaaaaaaaaaa", "eng")
    view.update({"current_mb": 100.0, "limits": {"max_mb": 200.0}}, 0.0)
    assert (growth(view), time_to_limit(view)) == ("-", "-")  # the daemon knows no rate yet
    view.update(
        {
            "current_mb": 100.0,
            "limits": {"max_mb": 200},
            "growth_mb_s": 10.0,
            "time_to_limit_s": 10.0,
        },
        1.0,
    )
    assert (growth(view), time_to_limit(view)) == ("10", "10s")
    view.update({"current_mb": 100.0, "growth_mb_s": 2.34, "time_to_limit_s": 150.0}, 2.0)
    assert (growth(view), time_to_limit(view)) == ("2.3", "2m")
    assert (megabytes(4113.94), megabytes(12345.6)) == ("4113.9", "12346")
    view.update({"current_mb": 250.0, "limits": {"max_mb": 200}, "growth_mb_s": 0.0}, 3.0)
    assert time_to_limit(view) == "now"
    view.ending = "stopped"
    assert time_to_limit(view) == "ending"


def test_screen_fits_80_columns_with_the_worst_agent_first() -> None:
    model = TopModel(host="build-7")
    model.apply_status(
        {
            "daemon": {"pid": 42, "uptime_s": 125},
            "monitoring": "enabled",
            "system_memory": {"total_mb": 16000, "available_mb": 6120.3, "percent": 61.5},
        }
    )
    for t in range(30):
        model.apply_stats(
            [
                # As the daemon reports it: growing 4 MB/s, (200 - mb) / 4 s from its limit.
                stats(
                    "engineer_3f9a0c12b7de",
                    40.0 + 4 * t,
                    growth_mb_s=4.0,
                    time_to_limit_s=(200 - 40.0 - 4 * t) / 4,
                ),
                stats("code-reviewer_0123456789ab", 160.0, "CRITICAL"),
            ],
            now=float(t),
        )
    model.apply_event({"type": "alert", "subprocess_id": "x_1", "message": "WARNING: memory " * 9})
    lines = screen(model)
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    text = "\n".join(lines)
    assert "build-7" in text
    assert "61.5% used" in text
    assert "6120 MB available of 16000 MB" in text
    rows = [line for line in lines if re.match(r"\S+_[0-9a-f]{12} ", line)]
    # CRITICAL first; the longer id is shown whole, and the columns line up after it.
    assert rows[0].startswith("code-reviewer_0123456789ab code-re… ")
    assert "CRITICAL" in rows[0]
    assert rows[1].startswith("engineer_3f9a0c12b7de      engineer ")
    assert any(c in rows[1] for c in SPARKS[1:])
    assert rows[1].endswith(" 11s")  # 156 MB, growing 4 MB/s, 200 MB limit
    assert " 4.0 " in rows[1]  # the daemon's growth rate, MB/s
    model.apply_event({"type": "exit", "subprocess_id": "engineer_3f9a0c12b7de",
                       "reason": "stopped", "signal": "SIGTERM"})  # fmt: skip
    assert "engineer_3f9a0c12b7de ended: stopped (SIGTERM)" in "\n".join(screen(model))
    assert "engineer_3f9a0c12b7de" not in model.agents


STATUS = {
    "daemon": {"pid": 42, "uptime_s": 125},
    "monitoring": "enabled",
    "system_memory": {"total_mb": 16000, "available_mb": 6120.3, "percent": 61.5},
}
HOST = {
    "budget_mb": 3072.0,
    "reserve_mb": 1600.0,
    "used_mb": 1234.4,
    "requested_mb": 1600.0,
    "held_mb": 1700.0,
    "free_mb": 1372.0,
    "queue_length": 3,
    "max_queued": 100,
    "shedding": None,
    "sheds": {"budget": 1, "psi": 1},
    "kernel_ceiling": True,
}


def test_the_budget_line_sits_under_system_memory() -> None:
    model = TopModel(host="build-7")
    model.apply_status({**STATUS, "host": HOST})
    model.apply_stats([stats("engineer_3f9a0c12b7de", 120.0)], now=0.0)
    lines = screen(model)
    assert all(len(line) <= 80 for line in lines)
    at = next(n for n, line in enumerate(lines) if "MB available of 16000 MB" in line)
    assert lines[at + 1] == "budget 3072 MB  used 1234 MB  requested 1600 MB  queue 3  sheds 2"
    assert lines[at + 2].startswith("SUBPROCESS_ID ")

    # While an agent is being shed the line says so (its alert below names it); on a
    # narrow terminal the line is cut at the edge, never wrapped.
    host = {**HOST, "shedding": "code-reviewer_0123456789ab", "queue_length": 12}
    model.apply_status({**STATUS, "host": host})
    (line,) = [line for line in screen(model) if line.startswith("budget ")]
    assert line == "budget 3072 MB  used 1234 MB  requested 1600 MB  queue 12  sheds 2  shedding"
    (line,) = [line for line in screen(model, width=60) if line.startswith("budget ")]
    assert line == "budget 3072 MB  used 1234 MB  requested 1600 MB  queue 12  …"

    # A daemon from before the budget: no line, the rest as before.
    model.apply_status(STATUS)
    lines = screen(model)
    assert not [line for line in lines if line.startswith("budget ")]
    at = next(n for n, line in enumerate(lines) if "MB available of 16000 MB" in line)
    assert lines[at + 1].startswith("SUBPROCESS_ID ")


def test_queue_events_show_as_they_happen() -> None:
    model = TopModel(host="build-7")
    model.apply_status({**STATUS, "host": HOST})
    waiting = {"subprocess_id": "eng_aaaaaaaaaaaa", "timestamp": "2026-11-26T14:02:59+00:00"}
    reason = "needs 500 MB; 100 MB of the 600 MB budget is free"
    model.apply_event({**waiting, "type": "queued", "position": 2, "reason": reason})
    model.apply_event({**waiting, "type": "admitted", "pid": 4711, "reason": "fits the budget"})
    model.apply_event({**waiting, "type": "launch"})
    gone = {"subprocess_id": "eng_bbbbbbbbbbbb", "timestamp": "2026-11-26T14:03:01+00:00"}
    model.apply_event({**gone, "type": "cancelled", "reason": "cancelled by uid 0"})
    assert list(model.events) == [
        f"14:02:59 eng_aaaaaaaaaaaa queued at position 2: {reason}",
        "14:02:59 eng_aaaaaaaaaaaa launched",  # admitted: its launch says it
        "14:03:01 eng_bbbbbbbbbbbb left the queue: cancelled by uid 0",
    ]
    text = "\n".join(screen(model))
    assert "eng_aaaaaaaaaaaa queued at position 2: needs 500 MB" in text


def test_restarts_show_beside_the_type_and_as_they_happen() -> None:
    model = TopModel(host="build-7")
    model.apply_status(STATUS)
    sid, other = "engineer_3f9a0c12b7de", "qa_0123456789ab"
    # An older daemon's rows have no "restarts": nothing is shown for them.
    model.apply_stats([stats(sid, 120.0, run=3, restarts=2), stats(other, 10.0)], now=0.0)
    lines = screen(model)
    assert all(len(line) <= 80 for line in lines)
    assert row(lines, sid).startswith(f"{sid} engi… ↻2    2  120.0 ")
    assert row(lines, other).startswith(f"{other}       qa          2 ")
    at = {"subprocess_id": sid, "timestamp": "2026-11-26T14:03:01+00:00"}
    model.apply_event({**at, "type": "exit", "reason": "memory_limit", "exit_code": None,
                       "signal": "SIGTERM", "run": 3, "next_restart_s": 0.8})  # fmt: skip
    model.apply_event({**at, "type": "restarting", "run": 3, "reason": "memory_limit",
                       "delay_s": 0.8, "message": "run 4 in 0.8 s"})  # fmt: skip
    # Each run is launched (its stats say which run), then `restarted`: one line for both.
    model.apply_event({**at, **stats(sid, 0.0, run=4, restarts=3), "type": "launch"})
    model.apply_event({**at, "type": "restarted", "run": 4, "pid": 4712, "reason": "memory_limit"})
    model.apply_event({**at, "type": "restart_limit", "run": 4, "reason": "exited"})
    model.apply_event({**at, **stats("qa_aaaaaaaaaaaa", 1.0), "type": "launch"})  # no "run"
    assert list(model.events) == [
        f"14:03:01 {sid} ended: memory_limit (SIGTERM)",
        f"14:03:01 {sid} restarting: run 4 in 0.8 s",
        f"14:03:01 {sid} launched (run 4)",
        "14:03:01 qa_aaaaaaaaaaaa launched",
    ]
    model.apply_stats([stats(sid, 20.0, restarts=3)], now=1.0)
    assert row(screen(model), sid).startswith(f"{sid} engi… ↻3 ")


# -- the real thing ------------------------------------------------------------------------------


class Tmux:
    """A tmux server of our own (its own socket), one 80x24 session."""

    def __init__(self, socket_path: Path, env: dict[str, str]) -> None:
        self.socket_path = socket_path
        self.env = env
        self.pid: int | None = None

    def run(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", str(self.socket_path), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-x", "80", "-y", "24", "-s", "top", command)
        self.pid = int(self.run("display-message", "-p", "#{pid}").strip())

    def screen(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "top").splitlines()

    def stop(self) -> None:
        with suppress(subprocess.SubprocessError, OSError):
            self.run("kill-server")
        if self.pid is not None:  # kill-server failed or hung: the server's own pid
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def tmux(short_tmp: Path) -> Iterator[Tmux]:
    require_tool("tmux", "`claude-pm top` on a real terminal")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TERM": "xterm-256color"}
    server = Tmux(short_tmp / "tmux.sock", env)
    yield server
    server.stop()


async def wait_screen(tmux: Tmux, predicate: Any, timeout_s: float = 15.0) -> list[str]:
    with anyio.fail_after(timeout_s):
        while True:
            lines = tmux.screen()
            if predicate(lines):
                return lines
            await anyio.sleep(0.1)


def row(lines: list[str], sid: str) -> str:
    return next((line for line in lines if line.startswith(sid)), "")


async def test_top_in_tmux_shows_two_agents_and_quits_on_q(
    daemon: DaemonProcess, tmux: Tmux
) -> None:
    async with daemon.async_client() as client:
        grower = simagent("--hold-mb", "30", "--rate", "4", "--cap", "120")
        eng = (await client.launch("engineer", grower))["subprocess_id"]
        qa = (await client.launch("qa-bot", simagent("--hold-mb", "115")))["subprocess_id"]
        command = (
            f"CLAUDE_PM_HOME={daemon.home.root} {sys.executable} -m supervisord top "
            "--interval 0.3; echo top exited $?; sleep 60"
        )
        tmux.start(command)
        lines = await wait_screen(tmux, lambda s: "WARNING" in row(s, qa) and "OK" in row(s, eng))
        assert all(len(line) <= 80 for line in lines)
        text = "\n".join(lines)
        assert "SUBPROCESS_ID" in text
        assert re.search(r"memory .*\d+\.\d% used", text)
        assert re.search(r"agents 2 ", text)
        # The host's budget from the real `status`, under system memory; nothing queued.
        budget = r"^budget \d+ MB  used \d+ MB  requested \d+ MB  queue 0  sheds 0$"
        assert re.search(budget, text, re.MULTILINE)
        assert re.match(rf"{qa} +qa-bot +1 +1\d\d\.\d +1\d\d\.\d WARNING ", row(lines, qa))
        # The grower's sparkline rises and it gets an estimate of its time to 200 MB.
        lines = await wait_screen(
            tmux,
            lambda s: (
                any(c in row(s, eng) for c in SPARKS[2:])
                and re.search(r" \d+[smh]$", row(s, eng)) is not None
            ),
        )
        assert re.match(rf"{eng} +engineer ", row(lines, eng))

        # An exit arrives through `subscribe`: the row goes, the event shows.
        await client.stop(eng)
        lines = await wait_screen(tmux, lambda s: f"{eng} ended: stopped" in "\n".join(s))
        assert row(lines, eng) == ""
        assert row(lines, qa)

        tmux.run("send-keys", "-t", "top", "q")
        await wait_screen(tmux, lambda s: any(line.startswith("top exited") for line in s), 10)
        assert "top exited 0" in tmux.screen()
