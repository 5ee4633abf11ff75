"""The operational guide's log analyses, read straight from the log files (no daemon needed).

Each report returns a ReportResult: text for people, data for ``--json``, and the bad lines it
skipped. A damaged log never raises: a line that is not a usable record is named and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from supervisord.errors import UsageError
from supervisord.sysmem import SystemMemory, system_memory

REPORTS = ("health", "growth", "leaks", "weekly", "thresholds")
ALERTS_FILE = Path("memory", "memory-alerts.log")
STATS_FILE = Path("memory", "subprocess-stats.jsonl")
LEAK_MB_PER_RUN = 100.0  # the guide's leak threshold
_RULE = "=" * 50
_MAX_LISTED_PROBLEMS = 20


@dataclasses.dataclass(frozen=True, slots=True)
class ReportResult:
    text: str
    data: dict[str, Any]
    problems: tuple[str, ...]


# ---------------------------------------------------------------------------- reading the logs


class _BadRecord(ValueError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class StatRecord:
    subprocess_id: str
    timestamp: str
    at: datetime  # naive local time, comparable with datetime.now() as in the guide
    instant: datetime  # aware; from `ts` when present so DST jumps do not reorder records
    peak_mb: float
    aborted: bool
    reason: str
    warnings: tuple[str, ...]

    @property
    def agent_type(self) -> str:
        return self.subprocess_id.split("_")[0]


@dataclasses.dataclass(frozen=True, slots=True)
class AlertRecord:
    timestamp: str
    at: datetime
    instant: datetime
    level: str
    message: str
    event: str | None
    subprocess_id: str | None
    current_mb: float | None
    available_mb: float | None


# at and instant are datetimes (not JSON); timestamp carries the same time as written.
_ALERT_FIELDS = tuple(
    f.name for f in dataclasses.fields(AlertRecord) if f.name not in {"at", "instant"}
)
R = TypeVar("R", StatRecord, AlertRecord)


@dataclasses.dataclass(frozen=True, slots=True)
class _Log(Generic[R]):
    records: tuple[R, ...]
    problems: tuple[str, ...]
    note: str | None  # set when there is nothing to report


def rotated_files(path: Path) -> list[Path]:
    """``path.N`` siblings oldest (highest N) first, then ``path`` itself if present."""
    prefix = path.name + "."
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return []
    rotated = []
    for p in siblings:
        suffix = p.name[len(prefix) :]
        if p.name.startswith(prefix) and suffix.isascii() and suffix.isdigit():
            rotated.append((int(suffix), p))
    files = [p for _, p in sorted(rotated, reverse=True)]
    return [*files, path] if path.is_file() else files


def iter_records(
    path: Path, problems: list[str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each JSON-object line; other lines go to ``problems``."""
    found = problems if problems is not None else []
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    # Only the last line can lack its newline: the writer may be mid-record.
                    what = "not JSON" if line.endswith("\n") else "incomplete last line"
                    found.append(f"{path.name} line {lineno}: {what} ({exc}); skipped")
                    continue
                if not isinstance(obj, dict):
                    kind = "array" if isinstance(obj, list) else type(obj).__name__
                    found.append(f"{path.name} line {lineno}: not a JSON object ({kind}); skipped")
                    continue
                yield lineno, obj
    except OSError as exc:
        found.append(f"{path.name}: cannot read ({exc.strerror or exc}); skipped")


def _get(obj: dict[str, Any], dotted: str) -> Any:
    value: Any = obj
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise _BadRecord(f"missing field {dotted}")
        value = value[key]
    return value


def _text(obj: dict[str, Any], dotted: str) -> str:
    value = _get(obj, dotted)
    if not isinstance(value, str):
        raise _BadRecord(f"field {dotted} is not a string ({value!r:.40})")
    return value


def _number(obj: dict[str, Any], dotted: str) -> float:
    value = _get(obj, dotted)
    # bool is an int subclass, and json accepts NaN/Infinity: neither is a memory size.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _BadRecord(f"field {dotted} is not a number ({value!r:.40})")
    return float(value)


def _optional_number(obj: dict[str, Any], dotted: str) -> float | None:
    try:
        return _number(obj, dotted)
    except _BadRecord:
        return None


def _optional_text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _local_naive(dt: datetime) -> datetime:
    return dt if dt.tzinfo is None else dt.astimezone().replace(tzinfo=None)


def _times(obj: dict[str, Any]) -> tuple[datetime, datetime]:
    raw = _text(obj, "timestamp")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise _BadRecord(f"field timestamp is not an ISO 8601 time ({raw!r:.40})") from None
    at = _local_naive(parsed)
    instant = at.astimezone()  # a naive time is local, as the contract writes it
    ts = obj.get("ts")
    if isinstance(ts, str):
        try:
            utc = datetime.fromisoformat(ts)
            instant = utc if utc.tzinfo else utc.replace(tzinfo=UTC)
        except ValueError:
            pass  # ts is optional; timestamp already gives the instant
    return at, instant


def _parse_stat(obj: dict[str, Any]) -> StatRecord:
    subprocess_id = _text(obj, "subprocess_id")
    peak_mb = _number(obj, "memory_stats.peak_mb")
    aborted = _get(obj, "memory_stats.aborted")
    if not isinstance(aborted, bool):
        raise _BadRecord(f"field memory_stats.aborted is not true/false ({aborted!r:.40})")
    at, instant = _times(obj)
    warnings = obj["memory_stats"].get("warnings")
    return StatRecord(
        subprocess_id=subprocess_id,
        timestamp=obj["timestamp"],
        at=at,
        instant=instant,
        peak_mb=peak_mb,
        aborted=aborted,
        reason=_optional_text(obj, "reason") or "unknown",
        warnings=tuple(w for w in warnings if isinstance(w, str))
        if isinstance(warnings, list)
        else (),
    )


def _parse_alert(obj: dict[str, Any]) -> AlertRecord:
    level, message = _text(obj, "level"), _text(obj, "message")
    at, instant = _times(obj)
    return AlertRecord(
        timestamp=obj["timestamp"],
        at=at,
        instant=instant,
        level=level,
        message=message,
        event=_optional_text(obj, "event"),
        subprocess_id=_optional_text(obj, "subprocess_id"),
        current_mb=_optional_number(obj, "current_mb"),
        available_mb=_optional_number(obj, "system_memory.available_mb"),
    )


def _load(path: Path, parse: Callable[[dict[str, Any]], R]) -> _Log[R]:
    problems: list[str] = []
    records: list[R] = []
    files = rotated_files(path)
    for file in files:
        for lineno, obj in iter_records(file, problems):
            try:
                records.append(parse(obj))
            except _BadRecord as exc:
                problems.append(f"{file.name} line {lineno}: {exc}; skipped")
    # Stable: records with equal instants keep their order in the files.
    records.sort(key=lambda r: r.instant)
    note = None
    if not files:
        note = f"no records yet: {path} does not exist"
    elif not records:
        note = f"no valid records in {path}" if problems else f"no records yet: {path} is empty"
    return _Log(tuple(records), tuple(problems), note)


def load_stats(logs_dir: Path) -> _Log[StatRecord]:
    return _load(logs_dir / STATS_FILE, _parse_stat)


def load_alerts(logs_dir: Path) -> _Log[AlertRecord]:
    return _load(logs_dir / ALERTS_FILE, _parse_alert)


# ---------------------------------------------------------------------------------- arithmetic


def percentile(values: Sequence[float], q: float) -> float:
    """numpy.percentile(values, q) with numpy's default ("linear") method, bit for bit."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    ordered = sorted(values)
    virtual = (len(ordered) - 1) * (q / 100)
    lo = math.floor(virtual)
    a, b = ordered[lo], ordered[min(lo + 1, len(ordered) - 1)]
    t = virtual - lo
    # numpy's _lerp interpolates from the nearer end, which differs in the last bit.
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


# ------------------------------------------------------------------------------------ reports


def _finish(lines: list[str], data: dict[str, Any], *logs: _Log[Any]) -> ReportResult:
    problems = tuple(p for log in logs for p in log.problems)
    if problems:
        lines += ["", f"{len(problems)} bad line(s) skipped:"]
        lines += [f"  {p}" for p in problems[:_MAX_LISTED_PROBLEMS]]
        if len(problems) > _MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more")
    return ReportResult("\n".join(lines), {**data, "problems": list(problems)}, problems)


_VERDICT_TEXT = {
    "CRITICAL": "CRITICAL: Very high memory usage!",
    "WARNING": "WARNING: High memory usage detected!",
    "OK": "Memory usage is healthy",
}


def _verdict(percent: float) -> str:
    # The guide tests > 80 before > 90, so its CRITICAL branch can never run.
    if percent > 90:
        return "CRITICAL"
    return "WARNING" if percent > 80 else "OK"


def _health(logs_dir: Path, now: datetime, system: SystemMemory) -> ReportResult:
    stats, alerts = load_stats(logs_dir), load_alerts(logs_dir)
    since = now - timedelta(hours=24)
    finished = [s for s in stats.records if s.at > since]
    levels = Counter(a.level for a in alerts.records if a.at > since)
    aborted = sum(s.aborted for s in finished)
    verdict = _verdict(system.percent)
    lines = [
        "System Memory Health Check",
        _RULE,
        f"Total Memory: {system.total_mb:.1f} MB",
        f"Available: {system.available_mb:.1f} MB ({100 - system.percent:.1f}%)",
        f"Used: {system.used_mb:.1f} MB ({system.percent:.1f}%)",
        "",
        "Last 24 hours (from the logs):",
        f"  Agents finished: {len(finished)} (aborted: {aborted})",
        "  Alerts: " + (", ".join(f"{n} {lvl}" for lvl, n in sorted(levels.items())) or "none"),
        *(f"  ({log.note})" for log in (stats, alerts) if log.note),
        "",
        _VERDICT_TEXT[verdict],
    ]
    data = {
        "system": system.as_dict(),
        "verdict": verdict,
        "last_24h": {"finished": len(finished), "aborted": aborted, "alerts": dict(levels)},
    }
    return _finish(lines, data, stats, alerts)


def _agent_growth(alerts: Sequence[AlertRecord]) -> dict[str, dict[str, Any]]:
    by_agent: dict[str, list[tuple[AlertRecord, float]]] = {}
    for a in alerts:
        if a.subprocess_id is not None and a.current_mb is not None:
            by_agent.setdefault(a.subprocess_id, []).append((a, a.current_mb))
    growth = {}
    for sid, seen in by_agent.items():
        (first, first_mb), (last, last_mb) = seen[0], seen[-1]
        elapsed_s = (last.instant - first.instant).total_seconds()
        rate = (last_mb - first_mb) / elapsed_s if elapsed_s > 0 else None
        growth[sid] = {
            "alerts": len(seen),
            "first_timestamp": first.timestamp,
            "last_timestamp": last.timestamp,
            "first_mb": first_mb,
            "last_mb": last_mb,
            "elapsed_s": round(elapsed_s, 3),
            "growth_mb_per_s": None if rate is None else round(rate, 3),
        }
    return growth


def _growth(logs_dir: Path, subprocess_id: str | None) -> ReportResult:
    log = load_alerts(logs_dir)
    alerts = [a for a in log.records if subprocess_id in (None, a.subprocess_id)]
    lines = ["Memory Growth Analysis" + (f" for {subprocess_id}" if subprocess_id else ""), _RULE]
    if log.note:
        lines.append(log.note)
    elif not alerts:
        lines.append(f"no alerts for {subprocess_id}")
    for a in alerts:
        lines += [f"{a.at}: {a.message}", f"  System Available: {_mb(a.available_mb)}", ""]
    growth = _agent_growth(alerts)
    if growth:
        lines.append("Growth per agent (first to last alert):")
    for sid, g in growth.items():
        if g["growth_mb_per_s"] is None:
            lines.append(f"  {sid}: {g['last_mb']:.1f} MB; too few alerts for a rate")
        else:
            lines.append(
                f"  {sid}: {g['first_mb']:.1f} MB -> {g['last_mb']:.1f} MB in "
                f"{g['elapsed_s']:.1f} s ({g['growth_mb_per_s']:+.2f} MB/s)"
            )
    alert_data = [{k: getattr(a, k) for k in _ALERT_FIELDS} for a in alerts]
    data = {"subprocess_id": subprocess_id, "alerts": alert_data, "agents": growth}
    return _finish(lines, data, log)


def _leaks(logs_dir: Path) -> ReportResult:
    log = load_stats(logs_dir)
    by_type: dict[str, list[float]] = {}
    for s in log.records:
        by_type.setdefault(s.agent_type, []).append(s.peak_mb)
    lines = ["Memory Usage Trends by Agent Type", _RULE, *([log.note] if log.note else [])]
    types: dict[str, dict[str, Any]] = {}
    for agent_type, peaks in by_type.items():
        lines += ["", f"{agent_type}:"]
        if len(peaks) == 1:
            types[agent_type] = {"runs": 1, "enough_data": False}
            lines.append("  1 run, not enough data")
            continue
        # The guide divides by runs, not runs - 1; kept so figures match its script.
        growth = (peaks[-1] - peaks[0]) / len(peaks)
        leak = growth > LEAK_MB_PER_RUN
        types[agent_type] = {
            "runs": len(peaks),
            "enough_data": True,
            "avg_peak_mb": round(sum(peaks) / len(peaks), 1),
            "max_peak_mb": max(peaks),
            "growth_mb_per_run": round(growth, 1),
            "possible_leak": leak,
        }
        lines += [
            f"  Runs: {len(peaks)}",
            f"  Avg Peak: {sum(peaks) / len(peaks):.1f} MB",
            f"  Max Peak: {max(peaks):.1f} MB",
            f"  Growth Rate: {growth:+.1f} MB/run",
            *(["  WARNING: Possible memory leak detected!"] if leak else []),
        ]
    return _finish(lines, {"types": types}, log)


def _weekly(logs_dir: Path, now: datetime) -> ReportResult:
    log = load_stats(logs_dir)
    since = now - timedelta(days=7)
    recent = [s for s in log.records if s.at > since]
    peaks = [s.peak_mb for s in recent]
    aborted = sum(s.aborted for s in recent)
    warnings = Counter(w.split(":")[0] for s in recent for w in s.warnings)
    reasons = Counter(s.reason for s in recent)
    lines = ["Weekly Memory Usage Report", _RULE, *([log.note] if log.note else [])]
    lines += [f"Since: {since:%Y-%m-%d %H:%M}", f"Total Subprocesses: {len(recent)}"]
    lines.append(f"Aborted Subprocesses: {aborted}")
    peak_data = None
    if peaks:
        peak_data = {"avg": round(sum(peaks) / len(peaks), 1), "max": max(peaks), "min": min(peaks)}
        lines += ["", "Memory Statistics:", f"  Average Peak: {sum(peaks) / len(peaks):.1f} MB"]
        lines += [f"  Maximum Peak: {max(peaks):.1f} MB", f"  Minimum Peak: {min(peaks):.1f} MB"]
    if warnings:
        lines += ["", "Warnings Summary:", *(f"  {w}: {n}" for w, n in warnings.items())]
    if reasons:
        lines += ["", "By Reason:", *(f"  {r}: {n}" for r, n in reasons.most_common())]
    data = {
        "since": since.isoformat(),
        "now": now.isoformat(),
        "total": len(recent),
        "aborted": aborted,
        "peak_mb": peak_data,
        "warnings": dict(warnings),
        "reasons": dict(reasons),
    }
    return _finish(lines, data, log)


def _thresholds(logs_dir: Path) -> ReportResult:
    log = load_stats(logs_dir)
    peaks = [s.peak_mb for s in log.records if not s.aborted]
    data: dict[str, Any] = {"successful_runs": len(peaks), "recommended": None}
    if not peaks:
        why = log.note or f"all {len(log.records)} runs were aborted"
        return _finish([f"No successful runs to base thresholds on ({why})."], data, log)
    p50, p90, p99 = (percentile(peaks, q) for q in (50, 90, 99))
    rec = {"warning_mb": int(p90), "critical_mb": int(p99), "max_mb": int(p99 * 1.5)}
    data.update(p50_mb=p50, p90_mb=p90, p99_mb=p99, recommended=rec)
    lines = [
        f"Recommended Thresholds based on {len(peaks)} successful runs:",
        f"  (p50 {p50:.1f} MB, p90 {p90:.1f} MB, p99 {p99:.1f} MB)",
        f"  Warning: {rec['warning_mb']} MB (90th percentile)",
        f"  Critical: {rec['critical_mb']} MB (99th percentile)",
        f"  Max: {rec['max_mb']} MB (150% of 99th percentile)",
    ]
    if rec["warning_mb"] >= rec["critical_mb"]:
        lines.append("  Note: warning is not below critical; more runs are needed to separate them")
    lines += ["", "As environment variables:"]
    lines += [f"export CLAUDE_PM_MEMORY_{k.upper()}={v}" for k, v in rec.items()]
    lines += ["", "In config/supervisord.toml:", "[memory]"]
    lines += [f"{k} = {v}" for k, v in rec.items()]
    return _finish(lines, data, log)


def run_report(
    name: str,
    logs_dir: Path,
    *,
    subprocess_id: str | None = None,
    now: datetime | None = None,
    system: SystemMemory | None = None,
) -> ReportResult:
    """Run one of REPORTS over ``logs_dir`` (``<home>/logs``)."""
    if name not in REPORTS:
        raise UsageError(f"unknown report {name!r}; choose one of {', '.join(REPORTS)}")
    if subprocess_id is not None and name != "growth":
        raise UsageError(f"report {name!r} takes no subprocess id")
    when = _local_naive(now) if now is not None else datetime.now()
    if name == "health":
        return _health(logs_dir, when, system if system is not None else system_memory())
    if name == "growth":
        return _growth(logs_dir, subprocess_id)
    if name == "leaks":
        return _leaks(logs_dir)
    if name == "weekly":
        return _weekly(logs_dir, when)
    return _thresholds(logs_dir)
