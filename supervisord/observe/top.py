"""``claude-pm top``: a live terminal view of system memory and every agent.

The view is built from two connections to the daemon: ``subscribe`` (launches, alerts, exits,
restarts and the admission queue's events, shown as they happen, each one triggering a fresh
poll) and a poll of ``stats`` and ``status`` (system memory, and the host's budget and queue)
every ``interval_s``. Everything on screen is laid out by hand in plain lines that fit the
terminal's width (80 columns is the design target, so it works over ssh); rich does the
colours and the full-screen redraw. ``q`` quits; so does Ctrl-C.

``TopModel`` and ``render`` are pure (explicit times, no I/O), so the layout is tested
without a terminal.
"""

from __future__ import annotations

import os
import socket
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from supervisord.control.client import AsyncClient
from supervisord.core.errors import DaemonNotRunning, SupervisordError
from supervisord.core.kinds import EventType

SPARKS = "▁▂▃▄▅▆▇█"
HISTORY = 240  # samples kept per agent; the sparkline shows the newest that fit
RECENT_EVENTS = 4
LEVEL_STYLES = {"OK": "green", "WARNING": "yellow", "CRITICAL": "bold red", "ABORTED": "magenta"}
# Fixed columns: (header, width, right-aligned). The sparkline takes what is left.
COLUMNS = (
    ("SUBPROCESS_ID", 21, False),
    ("TYPE", 8, False),
    ("PIDS", 4, True),
    ("MB", 6, True),
    ("PEAK", 6, True),
    ("LEVEL", 8, False),
    ("MB/S", 4, True),
)
# The daemon's own projection (``time_to_limit_s``): the same figure its alerts carry.
LIMIT_COLUMN = ("TO MAX", 6, True)
MIN_SPARK = 4
MIN_ID = 13  # a type of a few letters and its 12 hex digits


@dataclass
class AgentView:
    """What the screen knows of one agent: its last stats and its recent memory."""

    subprocess_id: str
    agent_type: str
    processes: int = 1
    current_mb: float = 0.0
    peak_mb: float = 0.0
    level: str = "OK"
    status: str = "OK"
    ending: str | None = None
    max_mb: float | None = None
    growth_mb_s: float | None = None
    time_to_limit_s: float | None = None
    restarts: int = 0  # runs started again (absent from an older daemon's rows: 0)
    history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def update(self, stats: Mapping[str, Any], now: float) -> None:
        self.agent_type = str(stats.get("agent_type", self.agent_type))
        self.processes = int(stats.get("process_count", len(stats.get("tree_pids", ())) or 1))
        self.current_mb = float(stats.get("current_mb", 0.0))
        self.peak_mb = float(stats.get("peak_mb", self.current_mb))
        self.level = str(stats.get("level", "OK"))
        self.status = str(stats.get("status", self.level))
        self.ending = stats.get("ending")
        limits = stats.get("limits") or {}
        max_mb = limits.get("max_mb")
        self.max_mb = float(max_mb) if isinstance(max_mb, int | float) else None
        self.growth_mb_s = _number(stats.get("growth_mb_s"))
        self.time_to_limit_s = _number(stats.get("time_to_limit_s"))
        self.restarts = int(_number(stats.get("restarts")) or 0)
        self.history.append((now, self.current_mb))


@dataclass
class TopModel:
    """The state of the screen, changed only by the daemon's answers and events."""

    agents: dict[str, AgentView] = field(default_factory=dict)
    status: dict[str, Any] | None = None
    events: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    host: str = field(default_factory=socket.gethostname)

    def apply_stats(self, agents: Sequence[Mapping[str, Any]], now: float) -> None:
        seen = set()
        for stats in agents:
            sid = str(stats["subprocess_id"])
            seen.add(sid)
            view = self.agents.get(sid)
            if view is None:
                view = self.agents[sid] = AgentView(sid, str(stats.get("agent_type", "")))
            view.update(stats, now)
        for sid in set(self.agents) - seen:
            del self.agents[sid]

    def apply_status(self, status: Mapping[str, Any]) -> None:
        self.status = dict(status)

    def apply_event(self, event: Mapping[str, Any]) -> None:
        sid = str(event.get("subprocess_id", ""))
        clock = _clock(event.get("timestamp"))
        kind = event.get("type")
        if kind == EventType.LAUNCH:
            run = event.get("run")  # every run is launched: past the first, say which
            again = f" (run {run})" if isinstance(run, int) and run > 1 else ""
            self.events.append(f"{clock} {sid} launched{again}")
        elif kind == EventType.ALERT:
            self.events.append(f"{clock} {sid} {event.get('message', event.get('event'))}")
        elif kind == EventType.EXIT:
            how = event.get("signal") or f"exit {event.get('exit_code')}"
            self.events.append(f"{clock} {sid} ended: {event.get('reason')} ({how})")
            self.agents.pop(sid, None)
        elif kind == EventType.QUEUED:
            where = f" at position {event['position']}" if event.get("position") else ""
            self.events.append(f"{clock} {sid} queued{where}: {event.get('reason')}")
        elif kind == EventType.CANCELLED:
            self.events.append(f"{clock} {sid} left the queue: {event.get('reason')}")
        elif kind == EventType.RESTARTING:
            run, delay = int(event.get("run") or 0) + 1, _number(event.get("delay_s")) or 0.0
            self.events.append(f"{clock} {sid} restarting: run {run} in {delay:.1f} s")
        # No line for ADMITTED, RESTARTED (a launch comes with each) nor RESTART_LIMIT (its alert).


def _clock(timestamp: Any) -> str:
    if isinstance(timestamp, str):
        try:
            return datetime.fromisoformat(timestamp).strftime("%H:%M:%S")
        except ValueError:
            pass
    return time.strftime("%H:%M:%S")


# -- pure helpers --------------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int) -> str:
    """The newest ``width`` values as block characters, scaled between their min and max."""
    values = list(values)[-width:] if width > 0 else []
    if not values:
        return ""
    low, high = min(values), max(values)
    if high - low < 0.5:  # Flat within half a MB: a flat line, not amplified noise.
        return SPARKS[0] * len(values)
    top = len(SPARKS) - 1
    return "".join(SPARKS[round((v - low) / (high - low) * top)] for v in values)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def growth(view: AgentView) -> str:
    """The daemon's smoothed growth rate, MB/s."""
    rate = view.growth_mb_s
    if rate is None:
        return "-"
    return f"{rate:.1f}" if abs(rate) < 10 else f"{rate:.0f}"


def megabytes(mb: float) -> str:
    """Tenths while they fit in six characters (up to 9999.9 MB), whole MB beyond."""
    return f"{mb:.1f}" if mb < 9999.95 else f"{mb:.0f}"


def time_to_limit(view: AgentView) -> str:
    """When the agent reaches ``max_mb`` at its current growth rate, in a few characters."""
    if view.ending is not None:
        return "ending"
    if view.max_mb is not None and view.current_mb >= view.max_mb:
        return "now"
    if view.time_to_limit_s is None:
        return "-"
    return duration(view.time_to_limit_s)


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.0f}d"


def agent_type(view: AgentView, width: int) -> str:
    """The type, then ``↻N`` after N restarts; the type gives way, as the id starts with it."""
    runs = f" ↻{view.restarts}" if view.restarts > 0 else ""
    return _cell(view.agent_type, width - len(runs), False).rstrip() + runs


def _cell(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    return text.rjust(width) if right else text.ljust(width)


def _bar(percent: float, width: int) -> Text:
    filled = max(0, min(width, round(percent / 100 * width)))
    style = "green" if percent < 70 else "yellow" if percent < 90 else "bold red"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def render(model: TopModel, width: int, height: int) -> Group:
    """The whole screen as lines no wider than ``width``."""
    width = max(width, 40)
    lines: list[Text] = [_title(model, width), *_memory(model, width), *_budget(model, width)]
    rows = sorted(
        model.agents.values(),
        key=lambda a: (-_LEVEL_ORDER.get(a.status, 0), -a.current_mb, a.subprocess_id),
    )
    # The id is what people copy into `claude-pm stop`: it gets its full length when the
    # line has room, at the sparkline's expense; the sparkline keeps MIN_SPARK at least.
    others = sum(w for _, w, _ in COLUMNS[1:]) + LIMIT_COLUMN[1] + len(COLUMNS) + 1
    longest = max([COLUMNS[0][1], *(len(a.subprocess_id) for a in rows)])
    widths = [max(MIN_ID, min(longest, width - others - MIN_SPARK))]
    widths += [w for _, w, _ in COLUMNS[1:]]
    spark_w = max(MIN_SPARK, width - others - widths[0])
    header = " ".join(_cell(h, w, r) for (h, _, r), w in zip(COLUMNS, widths, strict=True))
    header += " " + _cell("MEMORY", spark_w, False) + " " + _cell(*LIMIT_COLUMN[:2], True)
    lines.append(Text(header[:width], style="bold reverse"))
    room = max(1, height - len(lines) - RECENT_EVENTS - 3)
    shown = rows if len(rows) <= room else rows[: room - 1]
    for view in shown:
        lines.append(_row(view, widths, spark_w, width))
    if len(shown) < len(rows):
        lines.append(Text(f"… and {len(rows) - len(shown)} more", style="dim"))
    if not rows:
        lines.append(Text("no agents running", style="dim"))
    lines.append(Text(""))
    for entry in model.events:
        lines.append(Text(_cell(entry, width, False).rstrip(), style="dim"))
    lines.append(Text("q quit", style="bold"))
    return Group(*lines)


_LEVEL_ORDER = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "ABORTED": 3}


def _title(model: TopModel, width: int) -> Text:
    status = model.status or {}
    daemon = status.get("daemon") or {}
    parts = [f"claude-pm top  {model.host}"]
    if daemon:
        parts.append(f"pid {daemon.get('pid')}  up {duration(float(daemon.get('uptime_s', 0)))}")
    monitoring = status.get("monitoring")
    if isinstance(monitoring, str) and "disabled" in monitoring.lower():
        parts.append("MONITORING DISABLED")
    parts.append(time.strftime("%H:%M:%S"))
    return Text(_cell("  ".join(parts), width, False).rstrip(), style="bold")


def _memory(model: TopModel, width: int) -> list[Text]:
    system = (model.status or {}).get("system_memory") or {}
    total = sum(a.current_mb for a in model.agents.values())
    agents = f"agents {len(model.agents)}  using {total:.1f} MB"
    if not system:
        return [Text("memory  waiting for the daemon…", style="dim"), Text(agents)]
    percent = float(system.get("percent", 0.0))
    label = f" {percent:5.1f}% used"
    bar_w = max(10, min(40, width - 8 - len(label)))
    line = Text("memory ") + _bar(percent, bar_w) + Text(label)
    detail = (
        f"{system.get('available_mb', 0):.0f} MB available of {system.get('total_mb', 0):.0f} MB"
    )
    return [line, Text(_cell(f"{agents}   {detail}", width, False).rstrip())]


def _budget(model: TopModel, width: int) -> list[Text]:
    """The host's budget for every agent together, from ``status``'s ``host`` (none from a
    daemon without one)."""
    host = (model.status or {}).get("host")
    if not isinstance(host, Mapping):
        return []
    sheds = host.get("sheds")
    shed_count = sum(sheds.values()) if isinstance(sheds, Mapping) else 0
    parts = [
        f"budget {_number(host.get('budget_mb')) or 0:.0f} MB",
        f"used {_number(host.get('used_mb')) or 0:.0f} MB",
        f"requested {_number(host.get('requested_mb')) or 0:.0f} MB",
        f"queue {host.get('queue_length', 0)}",
        f"sheds {shed_count}",
    ]
    # Which agent: the host_pressure alert below names it (an id would not fit 80 columns).
    shedding = host.get("shedding")
    if shedding:
        parts.append("shedding")
    style = "bold red" if shedding else "yellow" if host.get("queue_length") else ""
    return [Text(_cell("  ".join(parts), width, False).rstrip(), style=style)]


def _row(view: AgentView, widths: list[int], spark_w: int, width: int) -> Text:
    style = LEVEL_STYLES.get(view.status, "")
    cells = [
        (view.subprocess_id, ""),
        (agent_type(view, widths[1]), ""),
        (str(view.processes), ""),
        (megabytes(view.current_mb), ""),
        (megabytes(view.peak_mb), ""),
        (view.status, style),
        (growth(view), ""),
    ]
    text = Text()
    for (value, cell_style), (_, _, right), w in zip(cells, COLUMNS, widths, strict=True):
        text.append(_cell(value, w, right), style=cell_style)
        text.append(" ")
    spark = sparkline([mb for _, mb in view.history], spark_w)
    text.append(_cell(spark, spark_w, False), style=style or "cyan")
    text.append(" ")
    text.append(_cell(time_to_limit(view), LIMIT_COLUMN[1], True))
    text.truncate(width)
    return text


# -- the live loop -------------------------------------------------------------------------------


@contextmanager
def _cbreak(fd: int) -> Iterator[bool]:
    """Single keys without Enter, restored on the way out; False when stdin is no terminal."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class Top:
    def __init__(self, socket_path: Path, *, interval_s: float, console: Console) -> None:
        self.socket_path = socket_path
        self.interval_s = interval_s
        self.console = console
        self.model = TopModel()
        self._poke = anyio.Event()
        self._dirty = anyio.Event()

    async def poll_once(self, client: AsyncClient) -> None:
        stats = await client.stats()
        status = await client.status()
        self.model.apply_stats(stats.get("agents", []), time.monotonic())
        self.model.apply_status(status)

    async def _poll(self, client: AsyncClient) -> None:
        while True:
            self._poke = anyio.Event()
            await self.poll_once(client)
            self._dirty.set()
            with anyio.move_on_after(self.interval_s):
                await self._poke.wait()

    async def _follow(self, client: AsyncClient) -> None:
        async for event in await client.subscribe():
            self.model.apply_event(event)
            self._poke.set()  # Fresh numbers now, not at the next interval.
            self._dirty.set()
        raise DaemonNotRunning(f"the daemon at {self.socket_path} went away")

    async def _keys(self, fd: int, done: anyio.CancelScope) -> None:
        while True:
            await anyio.wait_readable(fd)
            data = os.read(fd, 64)
            if not data or b"q" in data.lower():
                done.cancel()
                return

    def frame(self) -> Group:
        size = self.console.size
        return render(self.model, size.width, size.height)

    async def run(self, keys_fd: int | None) -> None:
        async with AsyncClient(self.socket_path) as poller, AsyncClient(self.socket_path) as sub:
            await self.poll_once(poller)
            with Live(
                self.frame(),
                console=self.console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._follow, sub)
                    tg.start_soon(self._poll, poller)
                    if keys_fd is not None:
                        tg.start_soon(self._keys, keys_fd, tg.cancel_scope)
                    while True:
                        # Redraw on news, and at least every interval (the clock, resizes).
                        with anyio.move_on_after(self.interval_s):
                            await self._dirty.wait()
                        self._dirty = anyio.Event()
                        live.update(self.frame(), refresh=True)


async def _once(socket_path: Path, console: Console) -> None:
    top = Top(socket_path, interval_s=0, console=console)
    async with AsyncClient(socket_path) as client:
        await top.poll_once(client)
    console.print(top.frame())


def main(socket_path: Path, *, interval_s: float = 1.0, once: bool = False) -> int:
    """Run the view until ``q``; one frame and out when ``once`` or stdout is no terminal."""
    console = Console()
    if once or not console.is_terminal:
        anyio.run(_once, socket_path, console)
        return 0
    fd = sys.stdin.fileno()
    top = Top(socket_path, interval_s=interval_s, console=console)
    try:
        with _cbreak(fd) as keys:
            anyio.run(top.run, fd if keys else None)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        # The task group wraps what ended it; the CLI maps our own errors to exit codes.
        leaf = _first_leaf(group)
        if isinstance(leaf, SupervisordError):
            raise leaf from None
        raise
    return 0


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error
