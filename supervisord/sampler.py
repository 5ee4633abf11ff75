"""Tree discovery and measurement: one scan of /proc per tick serves every agent.

A tree is the agent's process and every descendant. Descendants that setsid or double-fork
are reparented away from the agent (to the daemon when it is a subreaper, else to init), so
membership is remembered by (pid, start time) from scan to scan, and a new orphan that was
never seen is attributed by the ``CLAUDE_PM_SUBPROCESS_ID`` variable every agent inherits.

The methods here block (they read /proc): the supervisor runs them in a worker thread.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from supervisord import procfs
from supervisord.config import Metric
from supervisord.procfs import ProcEntry
from supervisord.sysmem import MIB

MARKER_ENV = "CLAUDE_PM_SUBPROCESS_ID"
Identity = tuple[int, int]  # (pid, start)


@dataclass(frozen=True, slots=True)
class Root:
    """What the sampler needs to know about one agent."""

    pid: int
    start: int
    metric: Metric = "rss"
    # With metric "pss", PSS is computed only once the RSS sum reaches this (an upper bound).
    pss_from_mb: float = 0.0


@dataclass(frozen=True, slots=True)
class TreeSample:
    members: tuple[Identity, ...]
    rss_bytes: int
    mb: float
    metric: Metric

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(pid for pid, _ in self.members)


@dataclass(frozen=True, slots=True)
class ScanResult:
    trees: Mapping[str, TreeSample]
    # Adopted orphans that died: the daemon (their parent by subreaping) must reap them.
    orphan_zombies: tuple[int, ...] = ()
    processes: int = 0


@dataclass
class Sampler:
    daemon_pid: int = field(default_factory=os.getpid)
    _members: dict[Identity, str] = field(default_factory=dict)
    _unrelated: set[Identity] = field(default_factory=set)

    def sample(self, roots: Mapping[str, Root]) -> ScanResult:
        table = procfs.scan()
        children: dict[int, list[int]] = defaultdict(list)
        for entry in table.values():
            children[entry.ppid].append(entry.pid)
        root_pids = {root.pid for root in roots.values()}
        self._attribute_orphans(table, roots, root_pids)
        trees: dict[str, TreeSample] = {}
        members: dict[Identity, str] = {}
        for agent_id, root in roots.items():
            seeds = [root.pid] if _same(table, root.pid, root.start) else []
            seeds += [
                pid
                for (pid, start), owner in self._members.items()
                if owner == agent_id and _same(table, pid, start)
            ]
            tree = _walk(table, children, seeds, root_pids - {root.pid})
            for ident in tree:
                members[ident] = agent_id
            trees[agent_id] = _measure(tree, table, root)
        self._members = members
        zombies = tuple(
            e.pid
            for e in table.values()
            if e.zombie and e.ppid == self.daemon_pid and e.pid not in root_pids
        )
        return ScanResult(trees=trees, orphan_zombies=zombies, processes=len(table))

    def remember(self, agent_id: str, members: Iterable[Identity]) -> None:
        """Members known from before (a re-adopted agent's escaped descendants, say)."""
        for ident in members:
            self._members[ident] = agent_id

    def forget(self, agent_id: str) -> None:
        self._members = {k: v for k, v in self._members.items() if v != agent_id}

    def _attribute_orphans(
        self, table: Mapping[int, ProcEntry], roots: Mapping[str, Root], root_pids: set[int]
    ) -> None:
        """Claim processes that were reparented before a scan ever saw them in a tree."""
        if not roots:
            return
        for entry in table.values():
            ident = (entry.pid, entry.start)
            if (
                entry.ppid not in (1, self.daemon_pid)
                or entry.pid in root_pids
                or entry.zombie
                or ident in self._members
                or ident in self._unrelated
            ):
                continue
            owner = procfs.environ_value(entry.pid, MARKER_ENV)
            if owner is not None and owner in roots:
                self._members[ident] = owner
            else:
                self._unrelated.add(ident)
        live = {(e.pid, e.start) for e in table.values()}
        self._unrelated &= live


def _same(table: Mapping[int, ProcEntry], pid: int, start: int) -> bool:
    entry = table.get(pid)
    return entry is not None and entry.start == start


def _walk(
    table: Mapping[int, ProcEntry],
    children: Mapping[int, list[int]],
    seeds: Iterable[int],
    other_roots: set[int],
) -> list[Identity]:
    seen: set[int] = set()
    stack = list(seeds)
    tree: list[Identity] = []
    while stack:
        pid = stack.pop()
        if pid in seen or pid in other_roots:
            continue
        seen.add(pid)
        entry = table[pid]
        tree.append((pid, entry.start))
        stack.extend(children.get(pid, ()))
    return tree


def _measure(tree: list[Identity], table: Mapping[int, ProcEntry], root: Root) -> TreeSample:
    live = [(pid, start) for pid, start in tree if not table[pid].zombie]
    rss = 0
    for pid, _ in live:
        exact = procfs.resident_bytes(pid)
        rss += table[pid].rss_bytes if exact is None else exact
    mb = rss / MIB
    metric: Metric = "rss"
    if root.metric == "pss" and mb >= root.pss_from_mb:
        pss = sum(procfs.pss_bytes(pid) or 0 for pid, _ in live)
        mb, metric = pss / MIB, "pss"
    return TreeSample(members=tuple(live), rss_bytes=rss, mb=round(mb, 1), metric=metric)
