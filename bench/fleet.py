"""Fleet race: twelve agents started together against a 3 GB host budget, and without one.

Twelve simulated agents (``supervisord.simagent``) of four kinds, launched together:

| kind | behaviour | request_mb | priority | on_pressure |
|---|---|---|---|---|
| ``steady`` (4) | holds 300 MB, exits 0 after 12 s | 300 | 10 | requeue |
| ``slow-leak`` (4) | grows 40 MB/s to 560 MB, exits 0 at 15 s | 400 (too low) | 5 | requeue |
| ``fast-leak`` (2) | grows 250 MB/s to 400 MB, exits 0 at 12 s | 400 | 0 | requeue |
| ``runaway`` (2) | grows 250 MB/s, no end: killed at max_mb 1024 | (warning_mb) | 0 | stop |

Their peaks add up to about twice the budget. The same fleet runs twice in the same
invocation, each on a daemon of its own: with per-agent limits only (no ``[host] budget_mb``:
the host's default budget, MemTotal less the reserve, is far above the fleet), then with
``[host] budget_mb = 3072``, where launches that do not fit wait in the admission queue and
the daemon sheds an agent when the fleet outgrows the budget.

An independent observer process (``python -m bench.fleet --observe``, not the daemon) scans
/proc every 20 ms, takes every process whose environment carries the daemon's home
(``CLAUDE_PM_HOME``) and an agent marker (``CLAUDE_PM_SUBPROCESS_ID``), and sums their exact
``statm`` RSS: the fleet's total, whatever the daemon believes. It also reads the kernel's
charge of the daemon's cgroup (every agent group together) each sample. Figures: the fleet's
peak total against the budget, kernel OOM kills (records ``oom_killed``, ``oom_kill`` alerts,
the host's ``/proc/vmstat`` counter), agents completed, shed and killed at their limit, and the
makespan (first launch to the last agent gone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    BenchResult,
    Daemon,
    Figure,
    ObserverProcess,
    Target,
    log,
    parse_utc,
    percentile,
    read_jsonl,
    short_tmpdir,
    start_time,
)
from bench.observer import rss_bytes
from supervisord.control.client import Client

MARKER = b"CLAUDE_PM_SUBPROCESS_ID="
HOME_VAR = b"CLAUDE_PM_HOME="
MIB = 1024 * 1024
INTERVAL_S = 0.02
PEAK_TARGET = 0.05  # over the budget, of the budget
LIMITS_ONLY, BUDGETED = "limits only", "budget"
BASELINE_LABEL = "per-agent limits only"


@dataclass(frozen=True, slots=True)
class Kind:
    agent_type: str
    count: int
    hold_mb: float
    rate_mb_s: float
    cap_mb: float
    duration_s: float | None  # None: grows until something stops it
    request_mb: float | None  # None: the daemon's fallback (history p90, else warning_mb)
    priority: int
    on_pressure: str

    def command(self, tag: str) -> list[str]:
        command = [PYTHON, "-m", "supervisord.simagent", "--hold-mb", f"{self.hold_mb:g}"]
        command += ["--rate", f"{self.rate_mb_s:g}", "--cap", f"{self.cap_mb:g}"]
        if self.duration_s is not None:
            command += ["--duration", f"{self.duration_s:g}"]
        return [*command, "--task", tag]


@dataclass(frozen=True, slots=True)
class Plan:
    budget_mb: int
    max_mb: int
    kinds: tuple[Kind, ...]
    timeout_s: float  # for the whole fleet of one run to be gone
    kill_above_mb: float  # the observer's safety net: the fleet's total never passes this

    @property
    def agents(self) -> int:
        return sum(k.count for k in self.kinds)

    def demand_mb(self) -> float:
        """The fleet's peaks added up, each agent's alone (a runaway's is its max_mb)."""
        return sum(k.count * min(k.cap_mb, float(self.max_mb)) for k in self.kinds)

    def memory(self) -> dict[str, Any]:
        return {
            "warning_mb": self.max_mb // 4,
            "critical_mb": self.max_mb // 2,
            "max_mb": self.max_mb,
            "check_interval_s": 1.0,
            "term_grace_s": 2.0,
        }

    def order(self) -> list[Kind]:
        """Launch order: the kinds interleaved, as a fleet arriving together would be."""
        rounds = max(k.count for k in self.kinds)
        return [k for n in range(rounds) for k in self.kinds if n < k.count]


FULL = Plan(
    budget_mb=3072,
    max_mb=1024,
    kinds=(
        Kind("steady", 4, 300, 0, 300, 12, 300, 10, "requeue"),
        Kind("slow-leak", 4, 40, 40, 560, 15, 400, 5, "requeue"),
        Kind("fast-leak", 2, 20, 250, 400, 12, 400, 0, "requeue"),
        Kind("runaway", 2, 20, 250, 1536, None, None, 0, "stop"),
    ),
    timeout_s=150,
    kill_above_mb=10_000,
)
QUICK = Plan(
    budget_mb=600,
    max_mb=400,
    kinds=(
        Kind("steady", 1, 150, 0, 150, 5, 150, 10, "requeue"),
        Kind("slow-leak", 1, 20, 40, 300, 7, 200, 5, "requeue"),
        Kind("fast-leak", 1, 20, 200, 300, 5, 300, 0, "requeue"),
        Kind("runaway", 1, 20, 200, 800, None, None, 0, "stop"),
    ),
    timeout_s=45,
    kill_above_mb=2500,
)


# -- the observer: a process of its own ---------------------------------------------------------


def _environ(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return None


AGENT_GROUP = "agent-"  # an agent's own cgroup; its parent holds every agent's
PENDING = ""  # a process of the daemon's home without a marker yet (the daemon, a fork)
UNREADABLE = "\0"  # no environment to read yet (see _classify)
UNREADABLE_TRIES = 50  # samples (1 s) before an unreadable process counts as not ours


def _classify(pid: int, home: bytes) -> str | None:
    """The agent id of a process of this home, PENDING if of the home but not (yet) an
    agent's or unreadable for now, None if not of this home."""
    environ = _environ(pid)
    if not environ:
        # Unreadable or empty: a process in the middle of exec reads so (the daemon's fork
        # becoming an agent), as do kernel threads. Looked at again (see UNREADABLE_TRIES),
        # not taken for a stranger at once (the quick fleet once missed an agent that way).
        return UNREADABLE
    ours, marker = False, None
    for item in environ.split(b"\0"):
        if item == HOME_VAR + home:
            ours = True
        elif item.startswith(MARKER):
            marker = item[len(MARKER) :].decode(errors="replace")
    if not ours:
        return None
    return marker or PENDING


def _available_mb() -> float:
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True, slots=True)
class KernelGroup:
    """The cgroup holding every agent group (the daemon's), found from an agent's own."""

    version: int
    path: Path

    @classmethod
    def of(cls, pid: int) -> KernelGroup | None:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, where = line.split(":", 2)
            if "memory" in controllers.split(","):
                path = Path("/sys/fs/cgroup/memory") / where.lstrip("/")
                # Not yet in its own group (still placing itself): asked again next sample.
                if path.name.startswith(AGENT_GROUP) and path.parent.is_dir():
                    return cls(1, path.parent)
            elif controllers == "":
                path = Path("/sys/fs/cgroup") / where.lstrip("/")
                if (
                    path.name.startswith(AGENT_GROUP)
                    and path.parent.is_dir()
                    and (path.parent / "memory.current").exists()
                ):
                    return cls(2, path.parent)
        return None

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def _keyed(self, name: str) -> dict[str, int]:
        text = self._read(name) or ""
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line)}

    def usage_mb(self) -> float | None:
        text = self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current")
        return None if text is None else int(text) / MIB

    def summary(self) -> dict[str, Any]:
        """Its high-water mark, limit hits and OOM counters, read before it goes."""
        if self.version == 1:
            peak, limit = (
                self._read("memory.max_usage_in_bytes"),
                self._read("memory.limit_in_bytes"),
            )
            oom = self._keyed("memory.oom_control")
            return {
                "path": str(self.path),
                "peak_mb": None if peak is None else round(int(peak) / MIB, 1),
                "limit_mb": None if limit is None else round(int(limit) / MIB, 1),
                "limit_hits": int(self._read("memory.failcnt") or 0),
                "oom_kill": oom.get("oom_kill", 0),
                "under_oom": oom.get("under_oom", 0),
            }
        peak, limit = self._read("memory.peak"), self._read("memory.max")
        events = self._keyed("memory.events")
        return {
            "path": str(self.path),
            "peak_mb": None if peak is None else round(int(peak) / MIB, 1),
            "limit_mb": None if limit in (None, "max\n") else round(int(limit or 0) / MIB, 1),
            "limit_hits": events.get("max", 0),
            "oom_kill": events.get("oom_kill", 0),
            "under_oom": 0,
        }


def observe(home: str, interval_s: float, kill_above_mb: float, timeout_s: float) -> dict[str, Any]:
    """Sample until a line (or EOF) on stdin; the fleet's figures."""
    home_b = os.fsencode(home)
    me = os.getpid()
    known: dict[int, str | None] = {}  # pid -> agent id, PENDING, UNREADABLE, None (not ours)
    tries: dict[int, int] = {}  # pid -> samples its environment could not be read
    t_first = time.time()
    deadline = time.monotonic() + timeout_s
    samples, max_gap = 0, 0.0
    peak, t_peak = 0.0, t_first
    per_agent: dict[str, float] = {}
    series: list[tuple[float, float, float | None]] = []  # time, RSS total, kernel's
    kernel: KernelGroup | None = None
    kernel_peak: float | None = None
    min_available = float("inf")
    killed: str | None = None
    prev: float | None = None
    next_sample = time.monotonic()
    while True:
        now = time.time()
        pids = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        for gone in known.keys() - pids:
            del known[gone]
            tries.pop(gone, None)
        for pid in pids:
            if pid != me and known.get(pid, PENDING) in (PENDING, UNREADABLE):
                known[pid] = _classify(pid, home_b)
                if known[pid] == UNREADABLE:
                    tries[pid] = tries.get(pid, 0) + 1
                    if tries[pid] >= UNREADABLE_TRIES:
                        known[pid] = None
        total = 0.0
        mine: dict[str, float] = {}
        for pid, agent in known.items():
            if agent and agent != UNREADABLE:
                mb = rss_bytes(pid) / MIB
                total += mb
                mine[agent] = mine.get(agent, 0.0) + mb
                if kernel is None:
                    kernel = KernelGroup.of(pid)
        for agent, mb in mine.items():
            per_agent[agent] = max(per_agent.get(agent, 0.0), mb)
        usage = None if kernel is None else kernel.usage_mb()
        if usage is not None:
            kernel_peak = max(kernel_peak or 0.0, usage)
        min_available = min(min_available, _available_mb())
        samples += 1
        if prev is not None:
            max_gap = max(max_gap, now - prev)
        prev = now
        if total > peak:
            peak, t_peak = total, now
        if not series or now - t_first - series[-1][0] >= 0.25 or abs(total - series[-1][1]) > 50:
            kernel_mb = None if usage is None else round(usage, 1)
            series.append((round(now - t_first, 2), round(total, 1), kernel_mb))
        if killed is None and total > kill_above_mb:
            killed = f"the fleet outgrew {kill_above_mb:g} MB"
        if killed is None and mine and time.monotonic() > deadline:
            killed = f"agents still alive after {timeout_s:g} s"
        if killed is not None:
            _kill_agents(known, home_b)
        next_sample += interval_s
        if next_sample < time.monotonic():
            next_sample = time.monotonic()
        ready, _, _ = select.select([sys.stdin], [], [], max(0.0, next_sample - time.monotonic()))
        if ready:
            break
    return {
        "t_first": t_first,
        "peak_total_mb": round(peak, 1),
        "t_peak": t_peak,
        "agents_seen": len(per_agent),
        "per_agent_peak_mb": {k: round(v, 1) for k, v in sorted(per_agent.items())},
        "sum_of_agent_peaks_mb": round(sum(per_agent.values()), 1),
        "kernel_group": None if kernel is None else kernel.summary(),
        "kernel_usage_peak_mb": None if kernel_peak is None else round(kernel_peak, 1),
        "min_available_mb": round(min_available, 1),
        "samples": samples,
        "max_gap_ms": round(max_gap * 1000, 1),
        "series": series,
        "killed_by_observer": killed,
    }


def _kill_agents(known: dict[int, str | None], home: bytes) -> None:
    """The safety net: SIGKILL every agent process, through a pidfd of a process still ours."""
    for pid, agent in known.items():
        if not agent or agent == UNREADABLE:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if _classify(pid, home) not in (None, PENDING, UNREADABLE):  # still the agent
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(pidfd)


class FleetObserver(ObserverProcess):
    """The bench's handle on an observer process of one daemon home."""

    def __init__(self, home: Path, kill_above_mb: float, timeout_s: float) -> None:
        argv = ["-m", "bench.fleet", "--observe", str(home)]
        argv += ["--kill-above-mb", f"{kill_above_mb:g}", "--timeout-s", f"{timeout_s:g}"]
        super().__init__(argv, "fleet observer")

    def stop(self) -> dict[str, Any]:
        """Stop sampling; what it saw."""
        try:
            return self.ask("stop")
        finally:
            self.close()


# -- the daemon's event stream -------------------------------------------------------------------


class Stream:
    """Every event of the daemon, as received, on a thread of its own."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.ended = False
        self._client = Client(daemon.socket, timeout_s=None)
        self._events = self._client.subscribe()  # subscribed before this returns
        self._thread = threading.Thread(target=self._run, name="fleet-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._events:
                if event.get("type") == "launch" and event.get("pid"):
                    pid = int(event["pid"])
                    start = start_time(pid)
                    if start is not None:  # killed by pid on stop, should the daemon not
                        self.daemon.roots.append((pid, start))
                with self.cond:
                    self.events.append(event)
                    self.cond.notify_all()
        except Exception as exc:  # the daemon went away: the caller sees ended
            log(f"fleet: event stream ended: {type(exc).__name__}: {exc}")
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def finals(self) -> dict[str, dict[str, Any]]:
        """Each agent's last word: its exit (not one before a requeue), or its cancellation."""
        done: dict[str, dict[str, Any]] = {}
        for event in self.events:
            kind = event.get("type")
            if (kind == "exit" and not event.get("requeued")) or kind == "cancelled":
                done[str(event["subprocess_id"])] = event
        return done

    def wait_all(self, ids: set[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not ids <= set(self.finals()):
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    return False
                self.cond.wait(min(left, 1.0))
        return True

    def join(self) -> None:
        self._thread.join(10)
        self._client.close()


# -- one run of the fleet ------------------------------------------------------------------------


@dataclass
class Race:
    who: str
    budget_mb: float  # the [host] budget in force (the host's default in the limits-only run)
    agents: int
    finished: bool
    peak_total_mb: float
    t_peak_s: float
    sum_of_agent_peaks_mb: float
    kernel_group: dict[str, Any] | None
    kernel_usage_peak_mb: float | None
    min_available_mb: float
    oom_records: int
    oom_alerts: int
    vmstat_oom_kills: int
    completed: int
    sheds: int
    shed_agents: dict[str, int]  # agent type -> sheds
    ceiling_sheds: int  # sheds because every agent together hit the kernel's ceiling
    limit_kills: int
    requeues: int
    queued: int
    queue_wait_p50_s: float | None
    queue_wait_max_s: float | None
    makespan_s: float | None
    host_status: dict[str, Any]
    outcomes: dict[str, list[str]]  # agent type -> final reasons
    timeline: list[str]  # what the daemon did, seconds after the first launch
    observer: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def oom_kills(self) -> int:
        """Kernel OOM kills: the daemon's records and alerts of them, or the host's counter
        (each may count the same kill, so the larger, not the sum)."""
        return max(self.oom_records, self.oom_alerts, self.vmstat_oom_kills)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "oom_kills": self.oom_kills}


def _vmstat_oom_kills() -> int:
    with contextlib.suppress(OSError), open("/proc/vmstat", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    return 0


def _race(plan: Plan, who: str) -> Race:
    sections: dict[str, dict[str, Any]] = {}
    if who == BUDGETED:
        sections["host"] = {"budget_mb": plan.budget_mb}
    tag = f"cpb-fleet-{os.getpid()}-{'b' if who == BUDGETED else 'a'}"
    vm_before = _vmstat_oom_kills()
    problems: list[str] = []
    with Daemon(plan.memory(), "fb" if who == BUDGETED else "fa", sections=sections) as daemon:
        stream = Stream(daemon)
        kinds: dict[str, Kind] = {}
        host_status: dict[str, Any] = {}
        try:
            observer = FleetObserver(daemon.home.root, plan.kill_above_mb, plan.timeout_s + 30)
            try:
                with daemon.client() as client:
                    t0 = time.time()
                    for n, kind in enumerate(plan.order()):
                        launched = client.launch(
                            kind.agent_type,
                            kind.command(f"{tag}-{n}"),
                            request_mb=kind.request_mb,
                            priority=kind.priority,
                            on_pressure=kind.on_pressure,
                        )
                        kinds[str(launched["subprocess_id"])] = kind
                        if launched.get("pid"):
                            pid = int(launched["pid"])
                            start = start_time(pid)
                            if start is not None:
                                daemon.roots.append((pid, start))
                    finished = stream.wait_all(set(kinds), plan.timeout_s)
                    host_status = dict(client.status().get("host") or {})
                    if not finished:
                        problems += _unfinished(client, stream, set(kinds), plan, daemon)
            finally:
                seen = observer.stop()
        finally:
            daemon.stop()
            stream.join()
        records = read_jsonl(daemon.home.stats_log)
        alerts = daemon.alerts()
    vm_after = _vmstat_oom_kills()
    return _tally(
        who, plan, t0, finished, kinds, stream.events, records, alerts, seen, host_status,
        vm_after - vm_before, problems,
    )  # fmt: skip


def _unfinished(
    client: Client, stream: Stream, ids: set[str], plan: Plan, daemon: Daemon
) -> list[str]:
    """What the daemon says of the agents that did not finish in time, and where its logs
    were kept (they would go with the daemon's throwaway home)."""
    missing = sorted(ids - set(stream.finals()))
    problems = [f"{len(missing)} of {len(ids)} agents not finished after {plan.timeout_s:g} s"]
    with contextlib.suppress(Exception):
        problems.append(f"queue: {json.dumps(client.queue())}")
    with contextlib.suppress(Exception):
        running = [s.get("subprocess_id") for s in client.stats().get("agents", [])]
        problems.append(f"running: {running}")
    keep = short_tmpdir("fleet-logs")
    with contextlib.suppress(OSError):
        for path in (daemon.home.daemon_log, daemon.home.stats_log, daemon.home.alerts_log):
            if path.exists():
                (keep / path.name).write_bytes(path.read_bytes())
    problems.append(f"missing: {missing}; the daemon's logs are kept in {keep}")
    return problems


def _tally(
    who: str,
    plan: Plan,
    t0: float,
    finished: bool,
    kinds: dict[str, Kind],
    events: list[dict[str, Any]],
    records: list[dict[str, Any]],
    alerts: list[dict[str, Any]],
    seen: dict[str, Any],
    host_status: dict[str, Any],
    vmstat_oom: int,
    problems: list[str],
) -> Race:
    exits = [e for e in events if e.get("type") == "exit"]
    finals: dict[str, dict[str, Any]] = {}
    for event in events:
        if (event.get("type") == "exit" and not event.get("requeued")) or event.get(
            "type"
        ) == "cancelled":
            finals[str(event["subprocess_id"])] = event
    outcomes: dict[str, list[str]] = {}
    for sid, event in sorted(finals.items()):
        kind = kinds.get(sid)
        reason = str(event.get("reason")) if event.get("type") == "exit" else "cancelled"
        outcomes.setdefault(kind.agent_type if kind else "?", []).append(reason)
    sheds = [e for e in exits if e.get("reason") == "host_pressure"]
    pressure_alerts = [a for a in alerts if a.get("event") == "host_pressure"]
    oom_records = [r for r in records if r.get("reason") == "oom_killed"]
    oom_alerts = [a for a in alerts if a.get("event") == "oom_kill"]
    waits = _queue_waits(events)
    ends = [parse_utc(str(e["ts"])) for e in finals.values() if e.get("ts")]
    problems += _shed_order_problems(events, kinds)
    if len(records) != len(exits):
        problems.append(f"{len(records)} stats records but {len(exits)} exit events")
    if seen.get("killed_by_observer"):
        problems.append(f"the observer killed the fleet: {seen['killed_by_observer']}")
    if not seen.get("agents_seen"):
        problems.append("the observer saw no agent process")
    budget = float(host_status.get("budget_mb") or (plan.budget_mb if who == BUDGETED else 0))
    return Race(
        who=who,
        budget_mb=budget,
        agents=len(kinds),
        finished=finished,
        peak_total_mb=float(seen["peak_total_mb"]),
        t_peak_s=round(float(seen["t_peak"]) - t0, 2),
        sum_of_agent_peaks_mb=float(seen["sum_of_agent_peaks_mb"]),
        kernel_group=seen.get("kernel_group"),
        kernel_usage_peak_mb=seen.get("kernel_usage_peak_mb"),
        min_available_mb=float(seen["min_available_mb"]),
        oom_records=len({r.get("subprocess_id") for r in oom_records}),
        oom_alerts=len({a.get("subprocess_id") for a in oom_alerts}),
        vmstat_oom_kills=vmstat_oom,
        completed=sum(
            1 for e in finals.values() if e.get("reason") == "exited" and e.get("exit_code") == 0
        ),
        sheds=len(sheds),
        shed_agents=dict(Counter(str(e.get("agent_type")) for e in sheds)),
        ceiling_sheds=sum(1 for a in pressure_alerts if "kernel" in str(a.get("message", ""))),
        limit_kills=sum(1 for e in exits if e.get("reason") == "memory_limit"),
        requeues=sum(1 for e in exits if e.get("requeued")),
        queued=len({e.get("subprocess_id") for e in events if e.get("type") == "queued"}),
        queue_wait_p50_s=round(percentile(waits, 50), 2) if waits else None,
        queue_wait_max_s=round(max(waits), 2) if waits else None,
        makespan_s=round(max(ends) - t0, 2) if ends and finished else None,
        host_status=host_status,
        outcomes=outcomes,
        timeline=_timeline(events, t0),
        observer={k: v for k, v in seen.items() if k not in ("kernel_group",)},
        problems=problems,
    )


def _timeline(events: list[dict[str, Any]], t0: float) -> list[str]:
    """Launches, queue moves, sheds, kills and exits (not the warnings), one line each."""
    lines = []
    for event in events:
        kind, what = str(event.get("type")), event.get("event")
        if kind == "alert" and what in ("memory_warning", "memory_critical", "recovered"):
            continue
        at = parse_utc(str(event["ts"])) - t0 if event.get("ts") else float("nan")
        label = f"{kind}:{what}" if what else kind
        extra = ""
        if kind == "exit":
            peak = (event.get("memory_stats") or {}).get("peak_mb")
            requeued = " requeued" if event.get("requeued") else ""
            extra = f" {event.get('reason')} code={event.get('exit_code')} peak={peak}{requeued}"
        elif kind == "queued":
            extra = f" pos={event.get('position')}: {event.get('reason')}"
        elif kind == "alert":
            extra = f" {event.get('current_mb')} MB: {event.get('message')}"
        lines.append(f"{at:6.2f} {label} {event.get('subprocess_id')}{extra}")
    return lines


def _queue_waits(events: list[dict[str, Any]]) -> list[float]:
    """Seconds from each ``queued`` to the ``admitted`` of the same agent that follows it."""
    since: dict[str, float] = {}
    waits: list[float] = []
    for event in events:
        sid, kind = str(event.get("subprocess_id")), event.get("type")
        if kind == "queued" and event.get("ts"):
            since[sid] = parse_utc(str(event["ts"]))
        elif kind == "admitted" and sid in since and event.get("ts"):
            waits.append(parse_utc(str(event["ts"])) - since.pop(sid))
    return waits


def _shed_order_problems(events: list[dict[str, Any]], kinds: dict[str, Kind]) -> list[str]:
    """Sheds of an agent while one of lower priority ran, not yet being ended: the budget's
    order (lowest priority first) says the other should have gone."""
    running: dict[str, int] = {}  # running agents -> priority
    ending: set[str] = set()
    problems: list[str] = []
    for event in events:
        sid, kind = str(event.get("subprocess_id")), event.get("type")
        agent = kinds.get(sid)
        if agent is None:
            continue
        if kind == "launch":
            running[sid] = agent.priority
            ending.discard(sid)
        elif kind == "exit":
            running.pop(sid, None)
            ending.discard(sid)
        elif kind == "alert" and event.get("event") in ("sigterm_sent", "sigkill_sent", "oom_kill"):
            ending.add(sid)
        elif kind == "alert" and event.get("event") == "host_pressure":
            lower = [
                other
                for other, priority in running.items()
                if other != sid and other not in ending and priority < agent.priority
            ]
            if lower:
                problems.append(
                    f"shed {sid} (priority {agent.priority}) while {', '.join(lower)} "
                    "of lower priority ran"
                )
            ending.add(sid)
    return problems


# -- the benchmark ---------------------------------------------------------------------------------


def run(quick: bool = False) -> BenchResult:
    plan = QUICK if quick else FULL
    result = BenchResult("fleet")
    result.details = {
        "plan": {
            "budget_mb": plan.budget_mb,
            "memory": plan.memory(),
            "agents": plan.agents,
            "demand_mb": plan.demand_mb(),
            "kinds": [asdict(k) for k in plan.kinds],
        }
    }
    log(
        f"fleet: {plan.agents} agents, peaks adding up to {plan.demand_mb():.0f} MB "
        f"({plan.demand_mb() / plan.budget_mb:.2f}x the {plan.budget_mb} MB budget)"
    )
    races: dict[str, Race] = {}
    for who in (LIMITS_ONLY, BUDGETED):
        log(f"fleet: {who}: starting")
        races[who] = _race(plan, who)
        log(f"fleet: {who}: {_summary(races[who], plan)}")
    result.details["runs"] = {who: race.as_dict() for who, race in races.items()}
    base, ours = races[LIMITS_ONLY], races[BUDGETED]
    for line in _table(races, plan):
        log(f"fleet: {line}")
    result.figures = _figures(plan, ours, base)
    for who, race in races.items():
        result.notes.append(f"{who}: {_summary(race, plan)}")
        result.notes += [f"{who}: PROBLEM: {p}" for p in race.problems]
    result.notes.append(
        "peak total: the fleet's summed statm RSS from an independent observer sampling /proc "
        f"every {INTERVAL_S * 1000:.0f} ms; oom kills: the larger of the daemon's oom_killed "
        "records, its oom_kill alerts and the host's /proc/vmstat oom_kill delta"
    )
    if not (ours.finished and base.finished):
        result.error = "the fleet did not finish in time: " + "; ".join(
            ours.problems[:1] + base.problems[:1]
        )
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _figures(plan: Plan, ours: Race, base: Race) -> list[Figure]:
    budget = float(plan.budget_mb)
    where = f"{plan.agents} agents, {plan.budget_mb} MB budget"
    return [
        Figure(
            key="fleet.peak_total_mb",
            label=f"fleet peak total (observer), {where}",
            unit="MB",
            value=ours.peak_total_mb,
            baseline=base.peak_total_mb,
            baseline_label=BASELINE_LABEL,
            target=Target("<", round(budget * (1 + PEAK_TARGET), 1)),
        ),
        Figure(
            key="fleet.peak_ratio",
            label="fleet peak total / budget",
            unit="x budget",
            value=_ratio(ours.peak_total_mb, budget),
            baseline=_ratio(base.peak_total_mb, budget),
            baseline_label=BASELINE_LABEL,
        ),
        Figure(
            key="fleet.oom_kills",
            label="kernel OOM kills, fleet race",
            unit="count",
            value=ours.oom_kills,
            baseline=base.oom_kills,
            baseline_label=BASELINE_LABEL,
            target=Target("<", 1),
        ),
        Figure(
            key="fleet.completed",
            label=f"agents completed (exit 0) of {plan.agents}",
            unit="count",
            value=ours.completed,
            baseline=base.completed,
            baseline_label=BASELINE_LABEL,
        ),
        Figure(
            key="fleet.shed",
            label="agents shed (host_pressure)",
            unit="count",
            value=ours.sheds,
            baseline=base.sheds,
            baseline_label=BASELINE_LABEL,
        ),
        Figure(
            key="fleet.limit_kills",
            label="agents killed at max_mb (memory_limit)",
            unit="count",
            value=ours.limit_kills,
            baseline=base.limit_kills,
            baseline_label=BASELINE_LABEL,
        ),
        Figure(
            key="fleet.makespan_s",
            label="fleet makespan, first launch to last exit",
            unit="s",
            value=ours.makespan_s,
            baseline=base.makespan_s,
            baseline_label=BASELINE_LABEL,
        ),
        Figure(
            key="fleet.makespan_ratio",
            label="fleet makespan / limits-only makespan",
            unit="x",
            value=_ratio(ours.makespan_s, base.makespan_s),
            baseline=1.0 if base.makespan_s else None,
            baseline_label=BASELINE_LABEL,
        ),
    ]


def _summary(race: Race, plan: Plan) -> str:
    kernel = race.kernel_group or {}
    outcomes = "; ".join(
        f"{kind}: {', '.join(f'{n} {r}' for r, n in sorted(Counter(reasons).items()))}"
        for kind, reasons in race.outcomes.items()
    )
    return (
        f"peak {race.peak_total_mb:.0f} MB ({race.peak_total_mb / plan.budget_mb:.2f}x "
        f"{plan.budget_mb} MB) at {race.t_peak_s:.1f} s, kernel group peak "
        f"{_show(kernel.get('peak_mb'))} MB (limit {_show(kernel.get('limit_mb'))} MB, hit "
        f"{kernel.get('limit_hits', 'n/a')}x), min available {race.min_available_mb:.0f} MB; "
        f"OOM kills {race.oom_kills} (records {race.oom_records}, alerts {race.oom_alerts}, "
        f"vmstat {race.vmstat_oom_kills}); completed {race.completed}/{race.agents}, shed "
        f"{race.sheds} {race.shed_agents or ''} ({race.ceiling_sheds} at the kernel ceiling), "
        f"requeued {race.requeues}, limit kills {race.limit_kills}; queued {race.queued} "
        f"(wait p50 {_show(race.queue_wait_p50_s)} s, max {_show(race.queue_wait_max_s)} s); "
        f"makespan {_show(race.makespan_s)} s; observer {race.observer.get('samples')} samples, "
        f"max gap {race.observer.get('max_gap_ms')} ms; outcomes: {outcomes}"
    )


def _show(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _table(races: dict[str, Race], plan: Plan) -> list[str]:
    header = (
        f"{'run':12} {'budget MB':>10} {'peak MB':>8} {'x budget':>8} {'kernel MB':>9} "
        f"{'OOM':>4} {'done':>5} {'shed':>5} {'limit':>5} {'queued':>6} {'makespan s':>10}"
    )
    lines = [header]
    for who, race in races.items():
        kernel = (race.kernel_group or {}).get("peak_mb")
        lines.append(
            f"{who:12} {race.budget_mb:>10.0f} {race.peak_total_mb:>8.0f} "
            f"{race.peak_total_mb / plan.budget_mb:>8.2f} {_show(kernel):>9} "
            f"{race.oom_kills:>4} {race.completed:>2}/{race.agents:<2} {race.sheds:>5} "
            f"{race.limit_kills:>5} {race.queued:>6} {_show(race.makespan_s):>10}"
        )
    base, ours = races[LIMITS_ONLY], races[BUDGETED]
    lines.append(
        f"ratios: peak/budget {_show(_ratio(ours.peak_total_mb, plan.budget_mb))} "
        f"(limits only {_show(_ratio(base.peak_total_mb, plan.budget_mb))}), makespan "
        f"budget/limits only {_show(_ratio(ours.makespan_s, base.makespan_s))}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.fleet --observe HOME``: the observer process."""
    p = argparse.ArgumentParser(prog="python -m bench.fleet")
    p.add_argument("--observe", metavar="HOME", required=True, help="the daemon's home")
    p.add_argument("--interval-s", type=float, default=INTERVAL_S)
    p.add_argument("--kill-above-mb", type=float, default=float("inf"))
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args(argv)
    with contextlib.suppress(OSError):
        os.nice(-10)  # As root: fewer missed samples while the fleet and the daemon run.
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    result = observe(args.observe, args.interval_s, args.kill_above_mb, args.timeout_s)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
