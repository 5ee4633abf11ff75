"""What every benchmark shares: a daemon to drive, process measurements, figures and output.

The daemon is started the way a user starts it (``python -m supervisord daemon`` with
``CLAUDE_PM_HOME`` and a config file written here) and spoken to only through the public
clients, so the suite measures whatever daemon is installed, however it works inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, Self

import tomli_w

from supervisord.config.home import Home
from supervisord.control.client import AsyncClient, Client, resolve_socket

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"


# -- processes ---------------------------------------------------------------------------------


def short_tmpdir(tag: str) -> Path:
    """A directory directly under /tmp: a socket path inside it must fit AF_UNIX's 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=f"cpb-{tag}-", dir="/tmp"))


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for processes the bench starts.

    The developer's own CLAUDE_PM_* settings must not change what is measured, and helper
    modules (``python -m bench.observer``) must import from this checkout whatever the cwd.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAUDE_PM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after ``comm`` (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks: tells a pid from its reuse."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and, if given, is still the one started then."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (all threads, dead ones included)."""
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mb(pid: int, key: str = "VmRSS") -> float:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM) in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise ProcessLookupError(pid)


@dataclass(frozen=True, slots=True)
class Usage:
    """A process's CPU over a measured window, and its memory at the end of it."""

    cpu_pct: float  # of one core
    cpu_s: float
    wall_s: float
    rss_mb: float
    hwm_mb: float

    def as_dict(self) -> dict[str, float]:
        return {
            "cpu_pct": round(self.cpu_pct, 3),
            "cpu_s": round(self.cpu_s, 3),
            "wall_s": round(self.wall_s, 3),
            "rss_mb": round(self.rss_mb, 1),
            "hwm_mb": round(self.hwm_mb, 1),
        }


def measure_usage(pid: int, window_s: float) -> Usage:
    """CPU % of one core from utime+stime over ``window_s`` (10 ms ticks: 0.05% at 20 s)."""
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    wall = t1 - t0
    return Usage(
        cpu_pct=100.0 * (cpu1 - cpu0) / wall,
        cpu_s=cpu1 - cpu0,
        wall_s=wall,
        rss_mb=status_mb(pid, "VmRSS"),
        hwm_mb=status_mb(pid, "VmHWM"),
    )


def kill_group(pid: int, start: int | None, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Signal the process group led by ``pid``, only while it is still the process we started.

    Agents and baseline trees run in their own session, so their group id is the leader's pid;
    the start-time check keeps a reused pid from being signalled.
    """
    if start is not None and start_time(pid) != start:
        return False
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int | None:
    """SIGTERM one process we started, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_utc(ts: str) -> float:
    """A record's ``ts`` (ISO 8601 UTC with ``Z``) as seconds since the epoch."""
    moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


# -- the daemon --------------------------------------------------------------------------------


class Daemon:
    """``python -m supervisord daemon`` on a throwaway home, with the config given here.

    Every agent launched through :meth:`launch` is remembered by (pid, start time), so that
    whatever a crashed daemon leaves behind is still killed, by pid, on :meth:`stop`.
    """

    def __init__(
        self,
        memory: Mapping[str, Any],
        tag: str = "d",
        sections: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.dir = short_tmpdir(tag)
        self.home = Home(self.dir / "h")
        self.memory = dict(memory)
        self.sections = dict(sections or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.version = ""
        self.roots: list[tuple[int, int | None]] = []

    @property
    def socket(self) -> Path:
        return resolve_socket(self.home)

    def start(self, timeout_s: float = 20.0) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self  # `with Daemon(...).start()` must not start a second one
        self.home.config_file.parent.mkdir(parents=True, exist_ok=True)
        document = {"memory": self.memory, **self.sections}
        self.home.config_file.write_text(tomli_w.dumps(document))
        # A file, not a pipe: nobody reads the daemon's stderr while it runs, and a full pipe
        # would block it.
        with open(self.dir / "daemon.stderr", "wb") as stderr:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "supervisord", "daemon"],
                env=clean_env(CLAUDE_PM_HOME=str(self.home.root)),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                err = (self.dir / "daemon.stderr").read_text(errors="replace")
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                with Client(self.socket, timeout_s=2) as client:
                    hello = client.hello()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the daemon did not answer in time") from None
                time.sleep(0.05)
        self.pid, self.version = int(hello["pid"]), str(hello.get("version", ""))
        return self

    def client(self, timeout_s: float = 120.0) -> Client:
        return Client(self.socket, timeout_s=timeout_s)

    def async_client(self) -> AsyncClient:
        return AsyncClient(self.socket)

    def launch(
        self, client: Client, agent_type: str, command: Sequence[str], **kw: Any
    ) -> dict[str, Any]:
        result = client.launch(agent_type, list(command), **kw)
        if result.get("queued"):
            raise RuntimeError(f"launch of {agent_type} queued, not started: {result['reason']}")
        pid = int(result["pid"])
        self.roots.append((pid, start_time(pid)))
        return result

    def alerts(self) -> list[dict[str, Any]]:
        return read_jsonl(self.home.alerts_log)

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGTERM (the daemon stops its agents), then make sure nothing of ours survives."""
        if self.proc is not None:
            stop_process(self.proc, timeout_s)
        for pid, start in self.roots:
            kill_group(pid, start)
        self.roots.clear()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- figures and output ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    op: Literal["<", ">"]
    limit: float

    def met(self, value: float) -> bool:
        return value < self.limit if self.op == "<" else value > self.limit

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}"


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured number of the daemon beside the same number for its baseline."""

    key: str  # stable, for the JSON: "overhead.cpu_pct.500"
    label: str
    unit: str
    value: float | None
    baseline: float | None
    baseline_label: str
    target: Target | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.value is None:
            return "MISS"
        return "PASS" if self.target.met(self.value) else "MISS"

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "value": self.value,
            "baseline": self.baseline,
            "baseline_label": self.baseline_label,
            "target": None if self.target is None else str(self.target),
            "verdict": self.verdict or None,
            "note": self.note or None,
        }


@dataclass
class BenchResult:
    name: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "figures": [f.as_dict() for f in self.figures],
            "details": self.details,
            "notes": self.notes,
            "error": self.error,
            "duration_s": round(self.duration_s, 1),
        }


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):  # a count
        return f"{value:,}"
    magnitude = abs(value)
    if magnitude >= 100:
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return text


def table(results: Iterable[BenchResult]) -> str:
    """A Markdown table, so the same text goes into docs/benchmarks.md as printed."""
    header = ("bench", "figure", "unit", "daemon", "baseline", "baseline is", "target", "")
    rows = [header]
    for result in results:
        for f in result.figures:
            rows.append(
                (
                    result.name,
                    f.label,
                    f.unit,
                    fmt(f.value),
                    fmt(f.baseline),
                    f.baseline_label,
                    "" if f.target is None else str(f.target),
                    f.verdict,
                )
            )
        if result.error:
            rows.append((result.name, f"FAILED: {result.error}", "", "", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {3, 4}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in numeric and n else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append(
                "|"
                + "|".join(
                    "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2)
                    for i, w in enumerate(widths)
                )
                + "|"
            )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            meminfo[name] = int(rest.split()[0])
    model = ""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_total_mb": round(meminfo["MemTotal"] / 1024),
        "memory_available_mb": round(meminfo.get("MemAvailable", 0) / 1024),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "daemon_commit": _git_head(),
        "loadavg": loadavg(),
    }


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: a busy machine shifts the latency figures."""
    return [round(x, 2) for x in os.getloadavg()]


def _git_head() -> str | None:
    """The checkout measured (read-only: rev-parse never touches the index)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def log(message: str) -> None:
    """Progress on stderr, so a long run shows it is alive and stdout keeps the table."""
    stamp = time.strftime("%H:%M:%S")
    sys.stderr.write(f"[{stamp}] {message}\n")
    sys.stderr.flush()


class ObserverProcess:
    """A sampling process of the bench's own, spoken to in JSON lines over its stdin and
    stdout: it prints ``ready`` once started, and one JSON answer per request."""

    def __init__(self, argv: Sequence[str], what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(
            [PYTHON, *argv],
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self._stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        if self._stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"the {what} did not start")

    def ask(self, line: str) -> dict[str, Any]:
        """Send one line; its answer (blocks until it comes)."""
        with contextlib.suppress(OSError):  # it may have ended: its last words are read below
            self._stdin.write(line + "\n")
            self._stdin.flush()
        answer = self._stdout.readline()
        if not answer:
            raise RuntimeError(f"the {self.what} exited without an answer")
        result: dict[str, Any] = json.loads(answer)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
