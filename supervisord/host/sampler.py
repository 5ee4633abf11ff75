"""Tree discovery and measurement.

A tree is the agent's process and every descendant. Descendants that setsid or double-fork
are reparented away from the agent (to the daemon when it is a subreaper, else to init), so
membership is remembered by (pid, start time) from sample to sample, and a new orphan that
was never seen is attributed by the ``CLAUDE_PM_SUBPROCESS_ID`` variable every agent
inherits.

What is measured is the root's ``metric``: "auto" (the default) is the working set of the
agent's memory cgroup (its charge less the inactive file cache, see ``host/cgroup/memstat``),
read from two kept-open files, and the RSS sum where the agent has no group; "rss" sums the
members' resident sizes (shared pages once per process: an upper bound), "pss" divides shared
pages among their sharers (computed only near a threshold: it costs a smaps_rollup each).

Two ways to sample:
- ``sample``: one scan of /proc for every tree (discovery of everything, orphans included),
  at the idle cadence;
- ``sample_fast``: only the given trees, from their known members' kept-open ``statm`` fds
  and their children lists, for agents that need a look sooner (growing fast, or young).

The methods block (they read /proc): the supervisor runs them in a worker thread.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from supervisord.core.identity import MARKER_ENV, Identity
from supervisord.core.limits import Measured, Metric
from supervisord.core.units import MIB
from supervisord.host import procfs
from supervisord.host.cgroup.base import SHIM_NAME, AgentCgroup
from supervisord.host.procfs import ProcEntry, StatmCache

# An agent whose cgroup usage has not moved is still read in full this often.
REREAD_IDLE_S = 10.0


@dataclass(frozen=True, slots=True)
class Root:
    """What the sampler needs to know about one agent."""

    pid: int
    start: int
    metric: Metric = "auto"
    # With metric "pss", PSS is computed only once the RSS sum reaches this (an upper bound).
    pss_from_mb: float = 0.0
    # The agent's memory cgroup: every process in it is in the tree, however it got away.
    cgroup: AgentCgroup | None = None

    def cgroup_pids(self) -> list[int]:
        if self.cgroup is None:
            return []
        try:
            return self.cgroup.pids()
        except OSError:
            return []  # removed already: the tree is gone


@dataclass(frozen=True, slots=True)
class TreeSample:
    members: tuple[Identity, ...]
    # The statm sum of the members, whatever the metric.
    rss_bytes: int
    mb: float
    # What ``mb`` is: "auto" became "working_set" for an agent with a cgroup, else "rss".
    metric: Measured
    # True when the kernel's count for the agent's cgroup had not moved since the last
    # sample: the tree was not read again, and this is that last sample.
    unchanged: bool = False
    # The cgroup's working set when that is what ``mb`` is.
    working_set_bytes: int | None = None
    # Members outside the agent's cgroup now (they moved themselves out): counted all the same.
    escaped: tuple[Identity, ...] = ()

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(pid for pid, _ in self.members)


@dataclass(frozen=True, slots=True)
class ScanResult:
    trees: Mapping[str, TreeSample]
    # Adopted orphans that died: the daemon (their parent by subreaping) must reap them.
    orphan_zombies: tuple[int, ...] = ()


@dataclass
class Sampler:
    daemon_pid: int = field(default_factory=os.getpid)
    _trees: dict[str, set[Identity]] = field(default_factory=lambda: defaultdict(set))
    _unrelated: set[Identity] = field(default_factory=set)
    _statm: StatmCache = field(default_factory=StatmCache)
    # Per agent with a cgroup: (usage bytes, when the tree was last read, that sample).
    _last: dict[str, tuple[int, float, TreeSample]] = field(default_factory=dict)
    # Per agent: members seen outside its cgroup. The group's count no longer covers such a
    # tree (what they had charged stays where they went), so it is measured by RSS from then.
    _escaped: dict[str, set[Identity]] = field(default_factory=lambda: defaultdict(set))
    # Agents whose own process was seen in their group (before that, missing from the group
    # is an escape only once it is past the launch's shim, which joins it).
    _root_joined: set[str] = field(default_factory=set)

    @property
    def open_fds(self) -> int:
        return len(self._statm)

    def sample(self, roots: Mapping[str, Root]) -> ScanResult:
        """Every tree, from one scan of /proc."""
        table = procfs.scan()
        children: dict[int, list[int]] = defaultdict(list)
        for entry in table.values():
            children[entry.ppid].append(entry.pid)
        root_pids = {root.pid for root in roots.values()}
        self._attribute_orphans(table, roots, root_pids)
        trees: dict[str, TreeSample] = {}
        now = time.monotonic()
        for agent_id, root in roots.items():
            seeds = [root.pid] if _same(table, root.pid, root.start) else []
            seeds += [
                pid for pid, start in self._trees.get(agent_id, ()) if _same(table, pid, start)
            ]
            tree = _walk(table, children, seeds, root_pids - {root.pid})
            live = [ident for ident in tree if not table[ident[0]].zombie]
            self._trees[agent_id] = set(tree)
            if root.cgroup is not None:
                self._check_membership(agent_id, root, live, set(root.cgroup_pids()))
            usage = _usage(root)
            trees[agent_id] = self._measure(live, root, usage, agent_id)
            if usage is not None:
                # The newest full read is what the fast path's idle shortcut compares with.
                self._last[agent_id] = (usage, now, trees[agent_id])
        for agent_id in [a for a in self._trees if a not in roots]:
            del self._trees[agent_id]
        self._statm.retain({ident for tree in self._trees.values() for ident in tree})
        zombies = tuple(
            e.pid
            for e in table.values()
            if e.zombie and e.ppid == self.daemon_pid and e.pid not in root_pids
        )
        return ScanResult(trees=trees, orphan_zombies=zombies)

    def sample_fast(self, roots: Mapping[str, Root]) -> dict[str, TreeSample]:
        """The given trees only, without scanning /proc.

        With a memory cgroup the group's process list is the tree (nothing escapes it); else
        the known members plus the children they forked since (``/proc/PID/task/*/children``).
        """
        trees: dict[str, TreeSample] = {}
        now = time.monotonic()
        for agent_id, root in roots.items():
            usage = _usage(root)
            last = self._last.get(agent_id)
            if (
                usage is not None
                and last is not None
                and usage == last[0]
                and now - last[1] < REREAD_IDLE_S
                and not self._escaped.get(agent_id)  # what they use is not in the count
            ):
                # Not a byte charged or freed in the whole tree since the last read: an idle
                # agent costs one pread. Read in full every REREAD_IDLE_S all the same.
                trees[agent_id] = replace(last[2], unchanged=True)
                continue
            known = self._trees[agent_id]
            known.add((root.pid, root.start))
            if root.cgroup is not None:
                live = self._cgroup_members(agent_id, known, root)
            else:
                live = self._walk_children(known)
            tree = self._measure(live, root, usage, agent_id)
            if len(tree.members) != len(live):
                known.intersection_update(tree.members)
            if usage is not None:
                self._last[agent_id] = (usage, now, tree)
            trees[agent_id] = tree
        return trees

    def _cgroup_members(self, agent_id: str, known: set[Identity], root: Root) -> list[Identity]:
        starts = dict(known)
        members: list[Identity] = []
        group = set(root.cgroup_pids())
        in_group = {root.pid, *group}
        # A known member missing from the group's list has ended, or moved itself out.
        self._check_membership(agent_id, root, [i for i in known if i[0] not in group], group)
        for pid in sorted(in_group):
            start = starts.get(pid)
            if start is None:  # new since the last look: one read of its stat for identity
                entry = procfs.read_entry(pid)
                if entry is None:
                    continue
                start = entry.start
            members.append((pid, start))
        away = self._escaped.get(agent_id)
        if away:
            # Outside the group only /proc finds them, and what they forked since.
            members += [i for i in self._walk_children(away) if i[0] not in in_group]
        # _measure drops what it cannot read (gone, or a pid reused within the group: its
        # identity is then looked up afresh next time).
        known.clear()
        known.update(members)
        return members

    def _check_membership(
        self, agent_id: str, root: Root, members: Iterable[Identity], group: set[int]
    ) -> None:
        """Remember the members that are alive and outside the agent's cgroup (``group``:
        its pids just read): escapees."""
        assert root.cgroup is not None
        if root.pid in group:
            self._root_joined.add(agent_id)
        for pid, start in members:
            if pid in group:
                continue
            if pid == root.pid and agent_id not in self._root_joined and _in_shim(pid):
                continue  # not joined yet: the shim joins, then becomes the agent
            entry = procfs.read_entry(pid)
            if entry is None or entry.start != start or entry.zombie:
                continue  # ended, not escaped
            if not root.cgroup.contains(pid):
                self._escaped[agent_id].add((pid, start))

    def _walk_children(self, known: set[Identity]) -> list[Identity]:
        live: list[Identity] = []
        seen: set[int] = set()
        stack = list(known)
        while stack:
            pid, start = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            if self._statm.resident_bytes(pid, start) is None:
                known.discard((pid, start))
                continue
            live.append((pid, start))
            for child in procfs.children_of(pid):
                if child not in seen and (entry := procfs.read_entry(child)) is not None:
                    known.add((child, entry.start))
                    stack.append((child, entry.start))
        return live

    def remember(self, agent_id: str, members: Iterable[Identity]) -> None:
        """Members known from before (a re-adopted agent's escaped descendants, say)."""
        self._trees[agent_id].update(members)

    def forget(self, agent_id: str) -> None:
        self._trees.pop(agent_id, None)
        self._last.pop(agent_id, None)
        self._escaped.pop(agent_id, None)
        self._root_joined.discard(agent_id)

    def close(self) -> None:
        self._statm.close()

    def _measure(
        self, live: list[Identity], root: Root, usage: int | None, agent_id: str = ""
    ) -> TreeSample:
        """The members that can be read, and the tree's memory by ``root.metric``.

        ``usage``: the cgroup's charge, just read (None without a group, or once it is gone).
        A tree with members that escaped its group is measured by RSS (the group misses them).
        """
        escaped = self._escaped.get(agent_id, set())
        members: list[Identity] = []
        rss = 0
        for pid, start in live:
            size = self._statm.resident_bytes(pid, start)
            # statm of a zombie (or of a process gone since the scan) has nothing to count.
            if size is None or (size == 0 and _zombie(pid)):
                continue
            members.append((pid, start))
            rss += size
        mb = rss / MIB
        metric: Measured = "rss"
        working_set = None
        if root.metric == "auto" and usage is not None and not escaped:
            working_set = _working_set(root, usage)
        if working_set is not None:
            mb, metric = working_set / MIB, "working_set"
        elif root.metric == "pss" and mb >= root.pss_from_mb:
            mb, metric = pss_bytes(pid for pid, _ in members) / MIB, "pss"
        # One order for the same tree however it was found, so unchanged trees compare equal.
        members.sort()
        return TreeSample(
            members=tuple(members),
            rss_bytes=rss,
            mb=round(mb, 1),
            metric=metric,
            working_set_bytes=working_set,
            escaped=tuple(i for i in members if i in escaped and self._outside(root, i[0])),
        )

    @staticmethod
    def _outside(root: Root, pid: int) -> bool:
        return root.cgroup is not None and not root.cgroup.contains(pid)

    def _attribute_orphans(
        self, table: Mapping[int, ProcEntry], roots: Mapping[str, Root], root_pids: set[int]
    ) -> None:
        """Claim processes that were reparented before a sample ever saw them in a tree."""
        if not roots:
            return
        known = {ident for tree in self._trees.values() for ident in tree}
        for entry in table.values():
            ident = (entry.pid, entry.start)
            if (
                entry.ppid not in (1, self.daemon_pid)
                or entry.pid in root_pids
                or entry.zombie
                or ident in known
                or ident in self._unrelated
            ):
                continue
            owner = procfs.environ_value(entry.pid, MARKER_ENV)
            if owner is not None and owner in roots:
                self._trees[owner].add(ident)
            else:
                self._unrelated.add(ident)
        live = {(e.pid, e.start) for e in table.values()}
        self._unrelated &= live


def _in_shim(pid: int) -> bool:
    """Still the launch's shim, which joins the agent's group before it execs the agent."""
    return any(arg == SHIM_NAME for arg in procfs.cmdline(pid))


def _usage(root: Root) -> int | None:
    if root.cgroup is None:
        return None
    try:
        return root.cgroup.usage_bytes()
    except OSError:
        return None


def pss_bytes(pids: Iterable[int]) -> int:
    """The members' proportional set sizes added up: shared pages divided among their
    sharers. A smaps_rollup walk of every mapping, each: call it off the event loop."""
    return sum(procfs.pss_bytes(pid) or 0 for pid in pids)


def _working_set(root: Root, usage: int) -> int | None:
    if root.cgroup is None:
        return None
    try:
        return root.cgroup.working_set_bytes(usage)
    except OSError:
        return None  # removed since usage was read: the members' RSS is all there is


def _zombie(pid: int) -> bool:
    entry = procfs.read_entry(pid)
    return entry is None or entry.zombie


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
