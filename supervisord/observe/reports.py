"""The operational guide's log analyses, read straight from the log files (no daemon needed).

Each report returns a ReportResult: text for people, data for ``--json``, and the bad lines it
skipped. A damaged log never raises: a line that is not a usable record is named and skipped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from supervisord.core.errors import UsageError
from supervisord.core.history import percentile
from supervisord.host.sysmem import SystemMemory, system_memory
from supervisord.observe.logread import (
    ALERT_FIELDS,
    AlertRecord,
    Log,
    StatRecord,
    load_alerts,
    load_stats,
    local_naive,
)

REPORTS = ("health", "growth", "leaks", "weekly", "thresholds")
LEAK_MB_PER_RUN = 100.0  # the guide's leak threshold
_RULE = "=" * 50
_MAX_LISTED_PROBLEMS = 20


@dataclasses.dataclass(frozen=True, slots=True)
class ReportResult:
    text: str
    data: dict[str, Any]
    problems: tuple[str, ...]


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


# ------------------------------------------------------------------------------------ reports


def _finish(lines: list[str], data: dict[str, Any], *logs: Log[Any]) -> ReportResult:
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
    alert_data = [{k: getattr(a, k) for k in ALERT_FIELDS} for a in alerts]
    data = {"subprocess_id": subprocess_id, "alerts": alert_data, "agents": growth}
    return _finish(lines, data, log)


def _by_agent(records: Sequence[StatRecord]) -> dict[str, list[StatRecord]]:
    """Each agent's runs; records come in time order, so agents in the order they appeared."""
    runs: dict[str, list[StatRecord]] = {}
    for s in records:
        runs.setdefault(s.subprocess_id, []).append(s)
    return runs


def _trend(peaks: Sequence[float]) -> tuple[float, bool]:
    """Growth per run, first to last, and whether it looks like a leak."""
    # The guide divides by runs, not runs - 1; kept so figures match its script.
    growth = (peaks[-1] - peaks[0]) / len(peaks)
    return growth, growth > LEAK_MB_PER_RUN


def _type_lines(agent_type: str, peaks: list[float], runs: int) -> tuple[list[str], dict[str, Any]]:
    """One type's block; ``peaks`` holds each agent's highest, ``runs`` counts all their runs."""
    lines = ["", f"{agent_type}:"]
    # Only said when an agent ran more than once, so one run per agent reads as the guide's.
    several = [] if runs == len(peaks) else [f"{len(peaks)} agents over {runs} runs"]
    if len(peaks) == 1:
        lines.append(
            f"  1 agent ({runs} runs), not enough data; its runs are below"
            if several
            else "  1 run, not enough data"
        )
        return lines, {"runs": 1, "enough_data": False}
    growth, leak = _trend(peaks)
    lines += [
        f"  Runs: {len(peaks)}",
        *(f"  ({s}, each at its highest peak)" for s in several),
        f"  Avg Peak: {sum(peaks) / len(peaks):.1f} MB",
        f"  Max Peak: {max(peaks):.1f} MB",
        f"  Growth Rate: {growth:+.1f} MB/run",
        *(["  WARNING: Possible memory leak detected!"] if leak else []),
    ]
    # "runs" keeps the guide's name: one entry per agent, as each agent had one run there.
    return lines, {
        "runs": len(peaks),
        "enough_data": True,
        "avg_peak_mb": round(sum(peaks) / len(peaks), 1),
        "max_peak_mb": max(peaks),
        "growth_mb_per_run": round(growth, 1),
        "possible_leak": leak,
    }


def _agent_lines(sid: str, runs: list[StatRecord]) -> tuple[list[str], dict[str, Any]]:
    peaks = [s.peak_mb for s in runs]
    aborted = sum(s.aborted for s in runs)
    growth, leak = _trend(peaks)
    lines = [
        f"  {sid}: {len(runs)} runs (aborted: {aborted})",
        f"    Peak per Run: {', '.join(f'{mb:.1f}' for mb in peaks)} MB",
        f"    Growth Rate: {growth:+.1f} MB/run",
        *(["    WARNING: Possible memory leak detected!"] if leak else []),
    ]
    return lines, {
        "agent_type": runs[0].agent_type,
        "runs": len(runs),
        "run_numbers": [s.run for s in runs],
        "aborted": aborted,
        "peaks_mb": peaks,
        "growth_mb_per_run": round(growth, 1),
        "possible_leak": leak,
    }


def _leaks(logs_dir: Path) -> ReportResult:
    """Per type, one entry per agent (its highest peak over its runs), so a restarted agent
    does not pass for several; then each agent with several runs, run against run."""
    log = load_stats(logs_dir)
    by_agent = _by_agent(log.records)
    by_type: dict[str, tuple[list[float], list[int]]] = {}
    for runs in by_agent.values():
        peaks, counts = by_type.setdefault(runs[0].agent_type, ([], []))
        peaks.append(max(s.peak_mb for s in runs))
        counts.append(len(runs))
    lines = ["Memory Usage Trends by Agent Type", _RULE, *([log.note] if log.note else [])]
    types: dict[str, dict[str, Any]] = {}
    for agent_type, (peaks, counts) in by_type.items():
        type_lines, types[agent_type] = _type_lines(agent_type, peaks, sum(counts))
        lines += type_lines
    agents: dict[str, dict[str, Any]] = {}
    for sid, runs in by_agent.items():
        if len(runs) > 1:
            if not agents:
                lines += ["", "Agents with several runs:"]
            agent_lines, agents[sid] = _agent_lines(sid, runs)
            lines += agent_lines
    return _finish(lines, {"types": types, "agents": agents}, log)


def _weekly(logs_dir: Path, now: datetime) -> ReportResult:
    """The last 7 days. Total Subprocesses counts agents (each once, however many runs);
    Runs counts records, and restarts the records that say run > 1 (not runs - agents: a
    restart in the week counts even when the agent's first run is older). Peaks, aborted,
    warnings and reasons are per run: each run has its own record and its own end."""
    log = load_stats(logs_dir)
    since = now - timedelta(days=7)
    recent = [s for s in log.records if s.at > since]
    agents = len({s.subprocess_id for s in recent})
    restarts = sum(s.run > 1 for s in recent)
    peaks = [s.peak_mb for s in recent]
    aborted = sum(s.aborted for s in recent)
    warnings = Counter(w.split(":")[0] for s in recent for w in s.warnings)
    reasons = Counter(s.reason for s in recent)
    lines = ["Weekly Memory Usage Report", _RULE, *([log.note] if log.note else [])]
    lines += [f"Since: {since:%Y-%m-%d %H:%M}", f"Total Subprocesses: {agents}"]
    lines.append(f"Runs: {len(recent)} (restarts: {restarts})")
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
        "total": agents,
        "runs": len(recent),
        "restarts": restarts,
        "aborted": aborted,
        "peak_mb": peak_data,
        "warnings": dict(warnings),
        "reasons": dict(reasons),
    }
    return _finish(lines, data, log)


def _thresholds(logs_dir: Path) -> ReportResult:
    """Percentiles of the peaks of runs that were not aborted. Per run, not per agent: a
    restarted agent's aborted runs are left out and its clean runs count, one each."""
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
    when = local_naive(now) if now is not None else datetime.now()
    if name == "health":
        return _health(logs_dir, when, system if system is not None else system_memory())
    if name == "growth":
        return _growth(logs_dir, subprocess_id)
    if name == "leaks":
        return _leaks(logs_dir)
    if name == "weekly":
        return _weekly(logs_dir, when)
    return _thresholds(logs_dir)
