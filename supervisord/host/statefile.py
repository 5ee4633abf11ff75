"""``run/state.json``: what a restarted daemon needs to re-adopt the agents it left running.

Written atomically (a temporary file renamed over the old one) so a crash at any instant
leaves either the previous or the new state, never half of one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog

from supervisord.core.records import AgentRecord

STATE_VERSION = 1
T = TypeVar("T")
log = structlog.get_logger("supervisord.host.statefile")


# What waits to run, besides the agents that run: the admission queue, runs due again after
# their restart delay, launches that wait for other agents; and how recent agents ended
# (for --after, and for `restart` of a failed one).
WAITING_SECTIONS = ("queue", "restarts", "after", "ended")
Waiting = Mapping[str, list[dict[str, Any]]]


def save(
    path: Path, daemon_pid: int, agents: list[dict[str, Any]], waiting: Waiting | None = None
) -> None:
    """Write the state (agents as ``as_dict`` made them, and each of WAITING_SECTIONS);
    blocks: call it from a thread."""
    document: dict[str, Any] = {"version": STATE_VERSION, "daemon_pid": daemon_pid}
    document["agents"] = agents
    for section in WAITING_SECTIONS:
        document[section] = list((waiting or {}).get(section, []))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # No fsync: the file must survive the daemon's crash, which the page cache does; after
    # the machine's crash there is no agent left to re-adopt anyway. The rename keeps it whole.
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, separators=(",", ":"))
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class State:
    """What ``load`` found: agents to re-adopt, queued launches, and a problem per entry
    that could not be read."""

    records: list[AgentRecord] = field(default_factory=list)
    queue: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    after: list[dict[str, Any]] = field(default_factory=list)
    ended: list[dict[str, Any]] = field(default_factory=list)


def load(path: Path) -> State:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return State()
    except (OSError, ValueError) as exc:
        return State(problems=[f"{path}: unreadable ({exc}); no agents re-adopted from it"])
    if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
        return State(problems=[f"{path}: not a version {STATE_VERSION} state file; ignored"])
    records: list[AgentRecord] = []
    problems: list[str] = []
    for n, entry in enumerate(document.get("agents", [])):
        try:
            records.append(AgentRecord(**entry))
        except TypeError as exc:
            problems.append(f"{path}: agent entry {n} is malformed ({exc}); skipped")
    sections: dict[str, list[dict[str, Any]]] = {}
    for section in WAITING_SECTIONS:
        entries = document.get(section, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            problems.append(f"{path}: the {section} section is malformed; none of it restored")
            entries = []
        sections[section] = entries
    return State(
        records,
        sections["queue"],
        problems,
        sections["restarts"],
        sections["after"],
        sections["ended"],
    )


def parse_entries(
    entries: Iterable[Mapping[str, Any]], parse: Callable[[Mapping[str, Any], int], T], noun: str
) -> tuple[list[T], list[str]]:
    """Each entry of a waiting section parsed (``parse(entry, n)``), and a problem for each
    that is malformed: one bad entry never costs the others."""
    parsed: list[T] = []
    problems: list[str] = []
    for n, entry in enumerate(entries):
        try:
            parsed.append(parse(entry, n))
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{noun} {n} is malformed ({exc!r}); dropped")
    return parsed, problems


Entries = Callable[[], list[tuple[bool, dict[str, Any]]]]


class StateWriter:
    """Keeps ``run/state.json`` current, off the event loop.

    At once when an agent came or went (``request(force=True)``), else within
    ``interval_s`` of a change; never while nothing changed, so an idle fleet costs no
    rewrites. ``entries`` gives each agent's entry and whether it changed since last asked.
    """

    def __init__(
        self,
        path: Path,
        entries: Entries,
        *,
        queue: Callable[[], Waiting] = dict,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self._entries = entries
        self._queue = queue
        self._last_queue: Waiting = {}
        self._clock = clock
        self._interval_s = interval_s
        self._wake = anyio.Event()
        self._due = float("inf")
        self._now = anyio.Event()
        self._done = anyio.Event()
        self._requested = 0
        self._written = 0
        self._count = -1

    def request(self, *, force: bool = False) -> None:
        due = self._clock() + (0.0 if force else self._interval_s)
        self._due = min(self._due, due)
        self._wake.set()
        if force:
            self._requested += 1
            self._now.set()

    async def written(self) -> None:
        """Until the file holds everything up to now: a launch is answered only once a crash
        right after it could not lose the agent. Concurrent callers share one write."""
        self.request(force=True)
        wanted = self._requested
        while self._written < wanted:
            await self._done.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            with anyio.move_on_after(max(0.0, self._due - self._clock())):
                await self._now.wait()  # a forced request cuts the wait short
            force = self._now.is_set()
            self._wake, self._now = anyio.Event(), anyio.Event()
            self._due = float("inf")
            covered = self._requested
            await self.write(force=force)
            self._written = covered
            self._done.set()
            self._done = anyio.Event()

    async def write(self, *, force: bool = True) -> None:
        entries = self._entries()
        queue = self._queue()
        changed = (
            any(c for c, _ in entries) or len(entries) != self._count or queue != self._last_queue
        )
        if not (force or changed):
            return
        self._count, self._last_queue = len(entries), queue
        agents = [entry for _, entry in entries]
        try:
            await anyio.to_thread.run_sync(save, self.path, os.getpid(), agents, queue)
        except OSError as exc:
            log.error("state_save_failed", path=str(self.path), error=str(exc))
