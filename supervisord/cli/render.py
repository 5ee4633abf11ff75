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
    return table(
        ["SUBPROCESS_ID", "PID", "PROCS", "MB", "PEAK", "LEVEL", "AGE", "MAX_MB"],
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
    lines = [budget_line(result["host"]), ""]
    rows = result["queue"]
    if not rows:
        return "\n".join([*lines, "no launches waiting"])
    body = table(
        ["POS", "SUBPROCESS_ID", "PRIO", "REQUEST_MB", "QUEUED_AT", "WAITS BECAUSE"],
        [
            [
                str(r["position"]),
                r["subprocess_id"],
                str(r["priority"]),
                f"{r['request_mb']:g}",
                r["queued_at"],
                r["reason"],
            ]
            for r in rows
        ],
    )
    return "\n".join([*lines, body])


def launched(result: Mapping[str, Any]) -> str:
    """The line ``launch`` prints: the id, and for a queued launch its place and why."""
    if not result.get("queued"):
        return str(result["subprocess_id"])
    return f"{result['subprocess_id']} queued at position {result['position']}: {result['reason']}"


MEMORY_FIGURES = ("measured", "rss_mb", "working_set_mb", "pss_mb")


def agent(stats: Mapping[str, Any]) -> str:
    folded = ("limits", "warnings", *MEMORY_FIGURES)
    lines = [f"{k}: {v}" for k, v in stats.items() if k not in folded]
    lines.append(memory_figures(stats))
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


def record(rec: Mapping[str, Any]) -> str:
    m = rec["memory_stats"]
    how = f"signal {rec['signal']}" if rec.get("signal") else f"exit code {rec['exit_code']}"
    return (
        f"{rec['subprocess_id']} ended: {rec['reason']} ({how}); peak {m['peak_mb']:.1f} MB, "
        f"end {m['end_mb']:.1f} MB, {m['duration_seconds']:.1f} s"
        + (", aborted" if m["aborted"] else "")
    )


def event(ev: Mapping[str, Any]) -> str:
    stamp = ev.get("timestamp", "")
    kind = ev.get("type", "alert")
    if kind == "alert" or ("message" in ev and "event" in ev):
        return f"{stamp} {ev['level']:<8} {ev['subprocess_id']} {ev['event']}: {ev['message']}"
    if kind == "exit":
        return f"{stamp} EXIT     " + record(ev)
    if kind == "launch":
        return f"{stamp} LAUNCH   {ev['subprocess_id']} pid {ev['pid']}: {' '.join(ev['command'])}"
    return f"{stamp} {kind}: {ev}"
