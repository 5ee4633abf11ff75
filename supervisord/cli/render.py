"""Human-readable output for the CLI (``--json`` output is the protocol's own, unchanged)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def agents_table(agents: list[Mapping[str, Any]]) -> str:
    if not agents:
        return "no agents running"
    # Last, and only from a daemon with restart policies: older rows have no "restarts".
    restarts = any("restarts" in a for a in agents)
    return table(
        ["SUBPROCESS_ID", "PID", "PROCS", "MB", "PEAK", "LEVEL", "AGE", "MAX_MB"]
        + (["RESTARTS"] if restarts else []),
        [
            [
                a["subprocess_id"],
                str(a["pid"]),
                str(a["process_count"]),
                f"{a['current_mb']:.1f}",
                f"{a['peak_mb']:.1f}",
                a["status"] if a.get("ending") is None else f"{a['status']} ({a['ending']})",
                f"{a['duration_seconds']:.0f}s",
                f"{a['max_mb'] if 'max_mb' in a else a['limits']['max_mb']:g}",
            ]
            + ([str(a.get("restarts", "-"))] if restarts else [])
            for a in agents
        ],
    )


def status(result: Mapping[str, Any]) -> str:
    d, mem, system = result["daemon"], result["config"]["memory"], result["system_memory"]
    return "\n".join(
        [
            f"daemon:     running, pid {d['pid']}, version {d['version']}, "
            f"up {d['uptime_s']:.0f} s",
            f"home:       {d['home']}",
            f"socket:     {d['socket']}",
            f"monitoring: {result['monitoring']}",
            f"thresholds: warning {mem['warning_mb']:g} MB, critical {mem['critical_mb']:g} MB, "
            f"max {mem['max_mb']:g} MB, every {mem['check_interval_s']:g} s, "
            f"grace {mem['term_grace_s']:g} s",
            f"system:     {system['available_mb']:.0f} of {system['total_mb']:.0f} MB available "
            f"({system['percent']:.1f}% used)",
            *([budget_line(result["host"])] if "host" in result else []),
            f"agents:     {result['agent_count']}",
            "",
            agents_table(result["agents"]),
            *waiting_lines(result),
        ]
    )


def budget_line(host: Mapping[str, Any]) -> str:
    sheds = sum(host.get("sheds", {}).values())
    return (
        f"budget:     {host['budget_mb']:.0f} MB for all agents (reserve {host['reserve_mb']:.0f}"
        f" MB): {host['used_mb']:.0f} MB used, {host['requested_mb']:.0f} MB requested, "
        f"{host['free_mb']:.0f} MB free; {host['queue_length']} queued, {sheds} shed"
    )


def queue(result: Mapping[str, Any]) -> str:
    """Everything that waits to run: for room in the budget, for its restart delay, or for
    other agents (``restarting`` and ``waiting`` are absent from older daemons' answers)."""
    lines = [budget_line(result["host"]), ""]
    rows = [
        *({**r, "state": "queued"} for r in result["queue"]),
        *result.get("restarting", []),
        *result.get("waiting", []),
    ]
    if not rows:
        return "\n".join([*lines, "no launches waiting"])
    body = table(
        ["POS", "SUBPROCESS_ID", "STATE", "PRIO", "REQUEST_MB", "SINCE", "WAITS BECAUSE"],
        [
            [
                "-" if r["position"] is None else str(r["position"]),
                r["subprocess_id"],
                r["state"],
                str(r["priority"]),
                f"{r['request_mb']:g}",
                r["queued_at"],
                r["reason"],
            ]
            for r in rows
        ],
    )
    return "\n".join([*lines, body])


def waiting_lines(result: Mapping[str, Any]) -> list[str]:
    """``status``'s lines for agents between runs, launches after others, failed agents."""
    lines = []
    for key, title in (("restarting", "restarting"), ("waiting", "waiting"), ("failed", "failed")):
        for row in result.get(key, []):
            lines.append(f"{title + ':':<12}{row['subprocess_id']}  {row['reason']}")
    return ["", *lines] if lines else []


def launched(result: Mapping[str, Any]) -> str:
    """The line ``launch`` prints: the id, and for a queued launch its place and why."""
    if not result.get("queued"):
        return str(result["subprocess_id"])
    return f"{result['subprocess_id']} queued at position {result['position']}: {result['reason']}"


MEMORY_FIGURES = ("measured", "rss_mb", "working_set_mb", "pss_mb")
RUN_FIGURES = ("run", "restarts", "next_restart_s")


def agent(stats: Mapping[str, Any]) -> str:
    folded = ("limits", "warnings", *MEMORY_FIGURES, *RUN_FIGURES)
    lines = [f"{k}: {v}" for k, v in stats.items() if k not in folded]
    lines.append(memory_figures(stats))
    if any(key in stats for key in RUN_FIGURES):
        lines.append(run_line(stats))
    lines.append("limits: " + ", ".join(f"{k}={v}" for k, v in stats["limits"].items()))
    lines += [f"  {w}" for w in stats.get("warnings", [])]
    return "\n".join(lines)


def memory_figures(stats: Mapping[str, Any]) -> str:
    """``memory: rss 1768.0 MB | working set 199.0 MB | pss n/a (current_mb is the working set)``"""
    shown = [
        f"{name} {'n/a' if stats.get(key) is None else f'{stats[key]:.1f} MB'}"
        for name, key in (("rss", "rss_mb"), ("working set", "working_set_mb"), ("pss", "pss_mb"))
        if key != "pss_mb" or key in stats
    ]
    measured = str(stats.get("measured") or "not sampled yet").replace("_", " ")
    return f"memory: {' | '.join(shown)} (current_mb is the {measured})"


def run_line(stats: Mapping[str, Any]) -> str:
    """``run: 3 (restarts 2)``, and ``, next run in 0.8 s`` while the next run is due."""
    line = f"run: {stats.get('run', '-')} (restarts {stats.get('restarts', '-')})"
    next_s = stats.get("next_restart_s")
    return line + (f", next run in {seconds(next_s)} s" if isinstance(next_s, int | float) else "")


def runs(rec: Mapping[str, Any]) -> str:
    """``run 3 (restarts 2)`` past the first run, ``next run in 0.8 s`` when one is due (or
    ``restarts cancelled`` by a stop between runs); absent from an older daemon's records."""
    parts = []
    run, next_s = rec.get("run"), rec.get("next_restart_s")
    if isinstance(run, int) and run > 1:
        parts.append(f"run {run} (restarts {rec.get('restarts', run - 1)})")
    if isinstance(next_s, int | float):
        parts.append(f"next run in {seconds(next_s)} s")
    if rec.get("restart_cancelled"):
        parts.append("restarts cancelled")
    return ", ".join(parts)


def seconds(value: float) -> str:
    """Tenths for a short delay, whole seconds for a long one: ``0.8``, ``12``."""
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``12th``, ``13th``, ``21st``."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def record(rec: Mapping[str, Any]) -> str:
    m = rec["memory_stats"]
    how = f"signal {rec['signal']}" if rec.get("signal") else f"exit code {rec['exit_code']}"
    restarts = runs(rec)
    return (
        f"{rec['subprocess_id']} ended: {rec['reason']} ({how}); peak {m['peak_mb']:.1f} MB, "
        f"end {m['end_mb']:.1f} MB, {m['duration_seconds']:.1f} s"
        + (", aborted" if m["aborted"] else "")
        + (f"; {restarts}" if restarts else "")
    )


RESTART_EVENTS = ("restarting", "restarted", "restart_limit")


def restart(ev: Mapping[str, Any]) -> str:
    """A restart event's line: the run that ended and what follows, or the run that began."""
    kind, run, reason = ev["type"], int(ev.get("run") or 1), ev.get("reason")
    code = "" if ev.get("exit_code") is None else f", exit {ev['exit_code']}"
    ended = f"{ordinal(run)} run ended ({reason}{code})"
    if kind == "restarting":
        delay = "" if ev.get("delay_s") is None else f" in {seconds(ev['delay_s'])} s"
        what = f"{ended}: run {run + 1}{delay}"
    elif kind == "restarted":
        pid = "" if ev.get("pid") is None else f", pid {ev['pid']}"
        why = f"the {ordinal(run - 1)} ended: {reason}"
        if reason == "restart":
            why = "asked by claude-pm restart"
        what = f"run {run} started{pid} ({why})"
    else:
        # The daemon's message starts with the id this line already names.
        why = str(ev.get("message") or "no more runs").removeprefix(f"{ev['subprocess_id']} ")
        what = f"{ended}; {why}"
    tag = "FAILED" if kind == "restart_limit" else "RESTART"
    return f"{tag:<8} {ev['subprocess_id']} {kind}: {what}"


def event(ev: Mapping[str, Any]) -> str:
    stamp = ev.get("timestamp", "")
    kind = ev.get("type", "alert")
    if kind == "alert" or ("message" in ev and "event" in ev):
        return f"{stamp} {ev['level']:<8} {ev['subprocess_id']} {ev['event']}: {ev['message']}"
    if kind == "exit":
        return f"{stamp} EXIT     " + record(ev)
    if kind == "launch":
        return f"{stamp} LAUNCH   {ev['subprocess_id']} pid {ev['pid']}: {' '.join(ev['command'])}"
    if kind in RESTART_EVENTS:
        return f"{stamp} {restart(ev)}"
    return f"{stamp} {kind}: {ev}"
