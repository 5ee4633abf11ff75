"""The log reports, over real log files written in the contract's record shapes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from supervisord.core.errors import UsageError
from supervisord.core.history import percentile
from supervisord.host.sysmem import SystemMemory
from supervisord.observe.logread import iter_records, load_stats, rotated_files
from supervisord.observe.reports import REPORTS, run_report

NOW = datetime(2026, 11, 26, 15, 0, 0)
SYSTEM = SystemMemory(
    total_mb=15890.1, available_mb=6120.3, used_mb=9769.8, percent=61.5, free_mb=2200.0
)


def _times(at: datetime) -> dict[str, str]:
    utc = at.astimezone(UTC).replace(tzinfo=None)
    return {
        "timestamp": at.isoformat(timespec="milliseconds"),
        "ts": utc.isoformat(timespec="milliseconds") + "Z",
    }


def stat(
    sid: str,
    peak_mb: float,
    at: datetime,
    *,
    aborted: bool = False,
    reason: str = "exited",
    warnings: list[str] | None = None,
    run: int | None = None,
    next_restart_s: float | None = None,
) -> dict[str, Any]:
    """A stats record; with ``run`` in the restart-aware shape, without it as written before."""
    runs = {"run": run, "restarts": run - 1, "next_restart_s": next_restart_s} if run else {}
    return {
        "subprocess_id": sid,
        "agent_type": sid.split("_")[0],
        "pid": 4711,
        "command": ["claude", "-p", "..."],
        "exit_code": None if aborted else 0,
        "signal": "SIGTERM" if aborted else None,
        "reason": reason,
        "memory_stats": {
            "start_mb": 41.0,
            "peak_mb": peak_mb,
            "end_mb": peak_mb - 10,
            "duration_seconds": 312.4,
            "warnings": warnings or [],
            "aborted": aborted,
        },
        **runs,
        **_times(at),
    }


def alert(
    sid: str, level: str, current_mb: float, at: datetime, *, available_mb: float = 6120.3
) -> dict[str, Any]:
    threshold = 2048 if level == "CRITICAL" else 1024
    return {
        **_times(at),
        "level": level,
        "event": f"memory_{level.lower()}",
        "subprocess_id": sid,
        "agent_type": sid.split("_")[0],
        "pid": 4711,
        "current_mb": current_mb,
        "threshold_mb": threshold,
        "message": f"{level}: memory {current_mb} MB exceeds {threshold} MB",
        "system_memory": {
            "total_mb": 15890.1,
            "available_mb": available_mb,
            "used_mb": 9769.8,
            "percent": 61.5,
            "free_mb": 2200.0,
        },
    }


def write(path: Path, *lines: dict[str, Any] | str) -> None:
    """Write records (dicts) and raw lines (str, written as given) one a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x) + "\n") if isinstance(x, dict) else x for x in lines)
    path.write_text(text, encoding="utf-8")


def stats_path(logs: Path, suffix: str = "") -> Path:
    return logs / "memory" / f"subprocess-stats.jsonl{suffix}"


def alerts_path(logs: Path, suffix: str = "") -> Path:
    return logs / "memory" / f"memory-alerts.log{suffix}"


ENG, QA, RES = "engineer_3f9a0c12b7de", "qa_0123456789ab", "research_aaaaaaaaaaaa"


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """A realistic day: three engineer runs with growing peaks, two qa runs, one research run."""
    logs = tmp_path / "logs"
    h = timedelta(hours=1)
    write(
        stats_path(logs),
        stat("engineer_000000000001", 500.0, NOW - 30 * h),
        stat(QA, 300.0, NOW - 20 * h, warnings=["WARNING: memory 1030.2 MB exceeds 1024 MB"]),
        stat("engineer_000000000002", 700.0, NOW - 10 * h),
        stat("qa_000000000002", 320.0, NOW - 5 * h),
        stat(
            ENG,
            4113.9,
            NOW - 2 * h,
            aborted=True,
            reason="memory_limit",
            warnings=[
                "WARNING: memory 1030.2 MB exceeds 1024 MB",
                "CRITICAL: memory 2107.4 MB exceeds 2048 MB",
            ],
        ),
        stat(RES, 200.0, NOW - h),
    )
    t0 = NOW - 2 * h
    write(
        alerts_path(logs),
        alert(QA, "WARNING", 1030.2, NOW - 30 * h),
        alert(ENG, "WARNING", 1030.2, t0, available_mb=7000.0),
        alert(ENG, "CRITICAL", 2107.4, t0 + timedelta(seconds=60), available_mb=6000.0),
        alert(ENG, "CRITICAL", 4006.2, t0 + timedelta(seconds=120), available_mb=4100.0),
    )
    return logs


# -------------------------------------------------------------------------------- percentile


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([7.5], 0, 7.5),
        ([7.5], 50, 7.5),
        ([7.5], 99, 7.5),
        ([100, 200], 50, 150.0),
        ([100, 200], 90, 190.0),
        ([100, 200], 99, 199.0),
        ([100, 200], 100, 200.0),
        ([1, 2, 3, 4], 25, 1.75),  # rank 0.75
        ([1, 2, 3, 4], 50, 2.5),  # rank 1.5
        ([1, 2, 3, 4], 90, 3.7),  # rank 2.7
        ([1, 2, 3, 4], 99, 3.97),  # rank 2.97
        ([400, 100, 300, 200], 90, 370.0),  # input order does not matter
        ([100, 200, 300, 400, 500], 90, 460.0),  # rank 3.6
        ([100, 200, 300, 400, 500], 99, 496.0),  # rank 3.96
        ([5, 5, 5, 9], 50, 5.0),
    ],
)
def test_percentile_matches_linear_interpolation(
    values: list[float], q: float, expected: float
) -> None:
    assert percentile(values, q) == pytest.approx(expected, abs=1e-9)


def test_percentile_interpolates_from_the_nearer_end_like_numpy() -> None:
    # numpy's _lerp uses b - (b - a) * (1 - t) when t >= 0.5; a + (b - a) * t would give
    # 3702.5199999999995 here.
    assert percentile([0.1, 4113.9], 90) == 3702.52
    assert percentile([0.1, 2.9], 75) == 2.2


def test_percentile_rejects_no_values_and_bad_q() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


# ---------------------------------------------------------------------------------- reports


def test_every_report_is_json_serialisable(logs: Path) -> None:
    for name in REPORTS:
        result = run_report(name, logs, now=NOW, system=SYSTEM)
        assert json.loads(json.dumps(result.data))["problems"] == []
        assert result.problems == ()
        assert "bad line" not in result.text


@pytest.mark.parametrize(
    ("percent", "verdict", "words"),
    [
        (50.0, "OK", "healthy"),
        (80.0, "OK", "healthy"),
        (80.1, "WARNING", "WARNING: High memory usage"),
        (90.0, "WARNING", "WARNING: High memory usage"),
        (95.0, "CRITICAL", "CRITICAL: Very high memory usage"),
    ],
)
def test_health_verdict_orders_critical_first(
    logs: Path, percent: float, verdict: str, words: str
) -> None:
    system = SystemMemory(
        total_mb=1000.0,
        available_mb=1000.0 - percent * 10,
        used_mb=percent * 10,
        percent=percent,
        free_mb=1.0,
    )
    result = run_report("health", logs, now=NOW, system=system)
    assert result.data["verdict"] == verdict
    assert words in result.text


def test_health_counts_the_last_24_hours(logs: Path) -> None:
    result = run_report("health", logs, now=NOW, system=SYSTEM)
    # 20h, 10h, 5h, 2h (aborted) and 1h ago; the 30h-old run is outside.
    assert result.data["last_24h"] == {
        "finished": 5,
        "aborted": 1,
        "alerts": {"WARNING": 1, "CRITICAL": 2},
    }
    assert result.data["system"]["available_mb"] == 6120.3
    assert "Available: 6120.3 MB (38.5%)" in result.text
    assert "Agents finished: 5 (aborted: 1)" in result.text
    assert "Alerts: 2 CRITICAL, 1 WARNING" in result.text


def test_growth_lists_alerts_and_rates(logs: Path) -> None:
    result = run_report("growth", logs)
    assert [a["subprocess_id"] for a in result.data["alerts"]] == [QA, ENG, ENG, ENG]
    eng = result.data["agents"][ENG]
    assert eng["first_mb"] == 1030.2
    assert eng["last_mb"] == 4006.2
    assert eng["elapsed_s"] == 120.0
    assert eng["growth_mb_per_s"] == pytest.approx((4006.2 - 1030.2) / 120, abs=1e-3)
    assert result.data["agents"][QA]["growth_mb_per_s"] is None  # one alert: no rate
    assert "System Available: 4100.0 MB" in result.text
    assert "+24.80 MB/s" in result.text


def test_growth_for_one_subprocess(logs: Path) -> None:
    result = run_report("growth", logs, subprocess_id=QA)
    assert [a["subprocess_id"] for a in result.data["alerts"]] == [QA]
    assert list(result.data["agents"]) == [QA]
    assert ENG not in result.text
    none = run_report("growth", logs, subprocess_id="engineer_ffffffffffff")
    assert none.data["alerts"] == []
    assert "no alerts for engineer_ffffffffffff" in none.text


def test_leaks_groups_by_type(logs: Path) -> None:
    result = run_report("leaks", logs)
    types = result.data["types"]
    # engineer peaks 500, 700, 4113.9: (4113.9 - 500) / 3 = 1204.6 MB/run.
    assert types["engineer"] == {
        "runs": 3,
        "enough_data": True,
        "avg_peak_mb": 1771.3,
        "max_peak_mb": 4113.9,
        "growth_mb_per_run": 1204.6,
        "possible_leak": True,
    }
    assert types["qa"]["growth_mb_per_run"] == 10.0
    assert types["qa"]["possible_leak"] is False
    assert types["research"] == {"runs": 1, "enough_data": False}
    assert "Growth Rate: +1204.6 MB/run" in result.text
    assert result.text.count("Possible memory leak") == 1
    assert "1 run, not enough data" in result.text


def test_weekly_filters_by_now(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    d = timedelta(days=1)
    write(
        stats_path(logs),
        stat("qa_1", 900.0, NOW - 10 * d),  # too old
        stat("qa_2", 800.0, NOW - 7 * d),  # exactly a week: the guide's filter is strict
        stat("qa_3", 300.0, NOW - 7 * d + timedelta(seconds=1), warnings=["WARNING: a"]),
        stat(
            "qa_4",
            600.0,
            NOW - d,
            aborted=True,
            reason="timeout",
            warnings=["WARNING: b", "CRITICAL: c"],
        ),
        stat("qa_5", 150.0, NOW - timedelta(minutes=5)),
    )
    result = run_report("weekly", logs, now=NOW)
    assert result.data["total"] == 3
    assert result.data["aborted"] == 1
    assert result.data["peak_mb"] == {"avg": 350.0, "max": 600.0, "min": 150.0}
    assert result.data["warnings"] == {"WARNING": 2, "CRITICAL": 1}
    assert result.data["reasons"] == {"exited": 2, "timeout": 1}
    assert "Total Subprocesses: 3" in result.text
    assert "Average Peak: 350.0 MB" in result.text
    # Nearly a week later only the 5-minute-old run remains, and 8 days later none.
    later = run_report("weekly", logs, now=NOW + 7 * d - timedelta(minutes=10))
    assert later.data["total"] == 1
    assert run_report("weekly", logs, now=NOW + 8 * d).data["peak_mb"] is None


def test_thresholds_from_successful_runs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    t = NOW - timedelta(hours=1)
    runs = [stat(f"qa_{i}", mb, t) for i, mb in enumerate([300.0, 100.0, 500.0, 200.0, 400.0])]
    write(stats_path(logs), *runs, stat("qa_x", 9000.0, t, aborted=True, reason="memory_limit"))
    result = run_report("thresholds", logs)
    assert result.data["successful_runs"] == 5
    assert result.data["p50_mb"] == 300.0
    assert result.data["p90_mb"] == pytest.approx(460.0)
    assert result.data["p99_mb"] == pytest.approx(496.0)
    assert result.data["recommended"] == {"warning_mb": 460, "critical_mb": 496, "max_mb": 744}
    assert "export CLAUDE_PM_MEMORY_WARNING_MB=460" in result.text
    assert "export CLAUDE_PM_MEMORY_CRITICAL_MB=496" in result.text
    assert "export CLAUDE_PM_MEMORY_MAX_MB=744" in result.text
    assert "[memory]\nwarning_mb = 460\ncritical_mb = 496\nmax_mb = 744" in result.text


def test_thresholds_with_only_aborted_runs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write(stats_path(logs), stat("qa_1", 5000.0, NOW, aborted=True, reason="memory_limit"))
    result = run_report("thresholds", logs)
    assert result.data == {"successful_runs": 0, "recommended": None, "problems": []}
    assert "No successful runs" in result.text
    assert "all 1 runs were aborted" in result.text
    assert "export" not in result.text


# ------------------------------------------------------------------------- restarted agents


def test_run_defaults_to_1_without_making_the_line_bad(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    t = NOW - timedelta(hours=1)
    odd = [stat(f"qa_{i}", 100.0, t, run=1) for i in range(5)]
    for record, value in zip(odd, [0, -2, True, "2", 2.5], strict=True):
        record["run"] = value
    write(stats_path(logs), stat("qa_old", 100.0, t), *odd, stat("qa_x", 100.0, t, run=3))
    log = load_stats(logs)
    assert [r.run for r in log.records] == [1, 1, 1, 1, 1, 1, 3]
    assert log.problems == ()


RESUMED = "engineer_5e55104e0001"


@pytest.fixture
def restarts(tmp_path: Path) -> Path:
    """A resumed session growing run after run (run 1 in the rotated file), a steady qa agent
    restarted once, a research agent restarted twice, and single-run agents between them."""
    logs = tmp_path / "logs"
    h = timedelta(hours=1)
    write(stats_path(logs, ".1"), stat(RESUMED, 600.0, NOW - 9 * h, reason="restart", run=1))
    write(
        stats_path(logs),
        stat("engineer_000000000001", 500.0, NOW - 8 * h),  # from before restarts: no run
        stat(RESUMED, 800.0, NOW - 7 * h, reason="restart", run=2, next_restart_s=0.0),
        stat("qa_000000000001", 300.0, NOW - 6 * h, run=1, next_restart_s=2.5),
        stat("qa_000000000001", 310.0, NOW - 6 * h + timedelta(seconds=10), run=2),
        stat(RESUMED, 1000.0, NOW - 5 * h, run=3, next_restart_s=1.0),
        stat("research_000000000001", 200.0, NOW - 4 * h, run=1, next_restart_s=1.0),
        stat(RESUMED, 2048.0, NOW - 3 * h, aborted=True, reason="memory_limit", run=4),
        stat("research_000000000001", 210.0, NOW - 2 * h, run=2, next_restart_s=1.0),
        stat("engineer_000000000002", 700.0, NOW - h, run=1),
        stat("research_000000000001", 205.0, NOW - h, run=3),
    )
    return logs


def test_leaks_counts_an_agent_once_at_its_highest_peak(restarts: Path) -> None:
    result = run_report("leaks", restarts)
    # Engineers in the order they appeared: the resumed one (max 2048), 500, 700.
    assert result.data["types"]["engineer"] == {
        "runs": 3,
        "enough_data": True,
        "avg_peak_mb": 1082.7,
        "max_peak_mb": 2048.0,
        "growth_mb_per_run": round((700.0 - 2048.0) / 3, 1),
        "possible_leak": False,
    }
    assert result.data["types"]["qa"] == {"runs": 1, "enough_data": False}
    assert result.data["types"]["research"] == {"runs": 1, "enough_data": False}
    assert result.text.split("\n\n")[1:4] == [
        "engineer:\n"
        "  Runs: 3\n"
        "  (3 agents over 6 runs, each at its highest peak)\n"
        "  Avg Peak: 1082.7 MB\n"
        "  Max Peak: 2048.0 MB\n"
        "  Growth Rate: -449.3 MB/run",
        "qa:\n  1 agent (2 runs), not enough data; its runs are below",
        "research:\n  1 agent (3 runs), not enough data; its runs are below",
    ]


def test_leaks_weighs_each_agent_run_against_run(restarts: Path) -> None:
    result = run_report("leaks", restarts)
    assert result.text.split("\n\n")[4] == (
        "Agents with several runs:\n"
        f"  {RESUMED}: 4 runs (aborted: 1)\n"
        "    Peak per Run: 600.0, 800.0, 1000.0, 2048.0 MB\n"
        "    Growth Rate: +362.0 MB/run\n"
        "    WARNING: Possible memory leak detected!\n"
        "  qa_000000000001: 2 runs (aborted: 0)\n"
        "    Peak per Run: 300.0, 310.0 MB\n"
        "    Growth Rate: +5.0 MB/run\n"
        "  research_000000000001: 3 runs (aborted: 0)\n"
        "    Peak per Run: 200.0, 210.0, 205.0 MB\n"
        "    Growth Rate: +1.7 MB/run"
    )
    agents = result.data["agents"]
    assert list(agents) == [RESUMED, "qa_000000000001", "research_000000000001"]
    assert agents[RESUMED] == {
        "agent_type": "engineer",
        "runs": 4,
        "run_numbers": [1, 2, 3, 4],
        "aborted": 1,
        "peaks_mb": [600.0, 800.0, 1000.0, 2048.0],
        "growth_mb_per_run": 362.0,  # (2048 - 600) / 4, the guide's division
        "possible_leak": True,
    }
    assert agents["qa_000000000001"]["possible_leak"] is False
    assert result.text.count("Possible memory leak") == 1
    assert result.problems == ()


def test_leaks_with_one_run_per_agent_reads_as_before(logs: Path) -> None:
    result = run_report("leaks", logs)
    assert result.data["agents"] == {}
    assert result.text == "\n".join(
        [
            "Memory Usage Trends by Agent Type",
            "=" * 50,
            "",
            "engineer:",
            "  Runs: 3",
            "  Avg Peak: 1771.3 MB",
            "  Max Peak: 4113.9 MB",
            "  Growth Rate: +1204.6 MB/run",
            "  WARNING: Possible memory leak detected!",
            "",
            "qa:",
            "  Runs: 2",
            "  Avg Peak: 310.0 MB",
            "  Max Peak: 320.0 MB",
            "  Growth Rate: +10.0 MB/run",
            "",
            "research:",
            "  1 run, not enough data",
        ]
    )


def test_weekly_counts_agents_once_and_every_run(restarts: Path) -> None:
    result = run_report("weekly", restarts, now=NOW)
    data = result.data
    assert (data["total"], data["runs"], data["restarts"], data["aborted"]) == (5, 11, 6, 1)
    assert data["peak_mb"] == {"avg": 624.8, "max": 2048.0, "min": 200.0}  # 6873 / 11 runs
    assert data["reasons"] == {"restart": 2, "exited": 8, "memory_limit": 1}
    lines = result.text.splitlines()
    at = lines.index("Total Subprocesses: 5")
    assert lines[at : at + 3] == [
        "Total Subprocesses: 5",
        "Runs: 11 (restarts: 6)",
        "Aborted Subprocesses: 1",
    ]
    # A week after run 1: the later runs still say they were restarts.
    later = run_report("weekly", restarts, now=NOW + timedelta(days=7, hours=-8, minutes=-30))
    assert (later.data["total"], later.data["runs"], later.data["restarts"]) == (5, 10, 6)


def test_weekly_with_one_run_per_agent(logs: Path) -> None:
    result = run_report("weekly", logs, now=NOW)
    assert (result.data["total"], result.data["runs"], result.data["restarts"]) == (6, 6, 0)
    assert "Total Subprocesses: 6\nRuns: 6 (restarts: 0)\nAborted Subprocesses: 1\n" in (
        result.text
    )


def test_thresholds_leave_out_a_restarted_agents_aborted_runs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    t = NOW - timedelta(hours=1)
    sid = "engineer_aaaa00000001"
    write(
        stats_path(logs),
        stat(sid, 2100.0, t, aborted=True, reason="memory_limit", run=1, next_restart_s=1.0),
        stat(sid, 2200.0, t, aborted=True, reason="timeout", run=2, next_restart_s=2.0),
        stat(sid, 400.0, t, run=3),
        stat("qa_1", 100.0, t),
        stat("qa_2", 300.0, t, reason="restart", run=1, next_restart_s=0.0),  # not aborted
    )
    result = run_report("thresholds", logs)
    assert result.data["successful_runs"] == 3
    assert result.data["p99_mb"] == pytest.approx(percentile([400.0, 100.0, 300.0], 99))
    assert result.text.startswith("Recommended Thresholds based on 3 successful runs:")
    assert result.data["recommended"]["max_mb"] < 2100


# ------------------------------------------------------------------------- missing and empty


def test_missing_logs_dir(tmp_path: Path) -> None:
    logs = tmp_path / "nowhere" / "logs"
    for name in REPORTS:
        result = run_report(name, logs, now=NOW, system=SYSTEM)
        assert result.problems == ()
        assert "no records yet" in result.text
        assert "does not exist" in result.text
    health = run_report("health", logs, now=NOW, system=SYSTEM)
    assert health.data["last_24h"] == {"finished": 0, "aborted": 0, "alerts": {}}
    assert health.data["verdict"] == "OK"
    assert str(stats_path(logs)) in health.text
    assert run_report("thresholds", logs).data["recommended"] is None
    assert run_report("leaks", logs).data["types"] == {}


def test_empty_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write(stats_path(logs), "\n", "   \n")
    write(alerts_path(logs))
    for name in REPORTS:
        result = run_report(name, logs, now=NOW, system=SYSTEM)
        assert result.problems == ()
        assert "is empty" in result.text
    assert run_report("weekly", logs, now=NOW).data["total"] == 0


# ------------------------------------------------------------------------------ corrupt lines


def test_corrupt_lines_are_reported_and_skipped(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    t = NOW - timedelta(hours=1)
    good = stat("qa_1", 100.0, t)
    no_peak = stat("qa_2", 100.0, t)
    del no_peak["memory_stats"]["peak_mb"]
    bad_flag = stat("qa_3", 100.0, t)
    bad_flag["memory_stats"]["aborted"] = "no"
    bad_time = stat("qa_4", 100.0, t)
    bad_time["timestamp"] = "yesterday"
    write(
        stats_path(logs),
        good,  # 1
        "this is not json\n",  # 2
        "[1, 2, 3]\n",  # 3
        "\n",  # 4: blank, silently skipped
        no_peak,  # 5
        bad_flag,  # 6
        bad_time,  # 7
        stat("qa_5", 300.0, t),  # 8
        json.dumps(stat("qa_6", 500.0, t))[:60],  # 9: truncated, no newline
    )
    result = run_report("weekly", logs, now=NOW)
    assert result.data["total"] == 2
    assert result.data["peak_mb"] == {"avg": 200.0, "max": 300.0, "min": 100.0}
    problems = result.problems
    assert len(problems) == 6
    assert problems[0].startswith("subprocess-stats.jsonl line 2: not JSON (Expecting value")
    assert problems[1] == "subprocess-stats.jsonl line 3: not a JSON object (array); skipped"
    assert problems[2] == (
        "subprocess-stats.jsonl line 5: missing field memory_stats.peak_mb; skipped"
    )
    assert problems[3].startswith("subprocess-stats.jsonl line 6: field memory_stats.aborted")
    assert problems[4].startswith("subprocess-stats.jsonl line 7: field timestamp is not")
    assert problems[5].startswith("subprocess-stats.jsonl line 9: incomplete last line")
    assert all(p.endswith("; skipped") for p in problems)
    assert "\n6 bad line(s) skipped:\n  subprocess-stats.jsonl line 2" in result.text
    assert result.data["problems"] == list(problems)


def test_corrupt_alert_lines(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    no_level = alert(QA, "WARNING", 1100.0, NOW)
    del no_level["level"]
    no_message = alert(QA, "WARNING", 1100.0, NOW)
    no_message["message"] = None
    write(
        alerts_path(logs), '"just a string"\n', no_level, no_message, alert(QA, "WARNING", 1.0, NOW)
    )
    result = run_report("growth", logs)
    assert len(result.data["alerts"]) == 1
    assert [p.split(":")[0] for p in result.problems] == [
        "memory-alerts.log line 1",
        "memory-alerts.log line 2",
        "memory-alerts.log line 3",
    ]
    assert "not a JSON object (str)" in result.problems[0]
    assert "missing field level" in result.problems[1]
    assert "field message is not a string" in result.problems[2]


def test_only_bad_lines(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write(stats_path(logs), *(f"garbage {i}\n" for i in range(25)))
    result = run_report("leaks", logs)
    assert f"no valid records in {stats_path(logs)}" in result.text
    assert len(result.problems) == 25
    assert "25 bad line(s) skipped:" in result.text
    assert "... and 5 more" in result.text  # the text lists 20, the tuple holds all


def test_iter_records_collects_problems(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    write(path, {"a": 1}, "nope\n", "\n", {"b": 2})
    problems: list[str] = []
    assert list(iter_records(path, problems)) == [(1, {"a": 1}), (4, {"b": 2})]
    assert len(problems) == 1
    assert problems[0].startswith("x.jsonl line 2: not JSON")


# ---------------------------------------------------------------------------- rotated files


def test_rotated_files_oldest_first(tmp_path: Path) -> None:
    base = stats_path(tmp_path)
    for suffix in ("", ".1", ".2", ".10", ".gz", ".bak"):
        write(stats_path(tmp_path, suffix))
    assert [p.name for p in rotated_files(base)] == [
        "subprocess-stats.jsonl.10",
        "subprocess-stats.jsonl.2",
        "subprocess-stats.jsonl.1",
        "subprocess-stats.jsonl",
    ]


def test_rotated_files_are_read_in_order(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    t = NOW - timedelta(hours=1)
    # Equal timestamps, so only the order of the files decides first and last.
    write(stats_path(logs, ".2"), stat("engineer_1", 100.0, t), "not json\n")
    write(stats_path(logs, ".1"), stat("engineer_2", 200.0, t))
    write(stats_path(logs), stat("engineer_3", 700.0, t))
    result = run_report("leaks", logs)
    engineer = result.data["types"]["engineer"]
    assert engineer["runs"] == 3
    assert engineer["growth_mb_per_run"] == 200.0  # (700 - 100) / 3, not negative
    assert result.problems == (
        "subprocess-stats.jsonl.2 line 2: not JSON "
        "(Expecting value: line 1 column 1 (char 0)); skipped",
    )


def test_rotated_files_without_current_file(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write(alerts_path(logs, ".1"), alert(ENG, "WARNING", 1030.0, NOW))
    result = run_report("growth", logs)
    assert len(result.data["alerts"]) == 1
    assert "no records yet" not in result.text


def test_records_are_sorted_by_time_across_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    t = NOW - timedelta(hours=1)
    write(alerts_path(logs), alert(ENG, "CRITICAL", 3000.0, t + timedelta(seconds=10)))
    write(alerts_path(logs, ".1"), alert(ENG, "WARNING", 1000.0, t))
    growth = run_report("growth", logs).data["agents"][ENG]
    assert (growth["first_mb"], growth["last_mb"], growth["growth_mb_per_s"]) == (
        1000.0,
        3000.0,
        200.0,
    )


# ------------------------------------------------------------------------------------ misc


def test_unknown_report_and_misplaced_id(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown report 'memory'"):
        run_report("memory", tmp_path)
    with pytest.raises(UsageError, match="takes no subprocess id"):
        run_report("leaks", tmp_path, subprocess_id=ENG)


@pytest.fixture
def central_europe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time UTC+1 in November (a POSIX TZ rule, so no tzdata is needed)."""
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("central_europe")
def test_aware_timestamps_are_compared_in_local_time(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    record = stat("qa_1", 100.0, NOW)
    record["timestamp"] = "2026-11-26T12:00:00+00:00"  # 13:00 local
    write(stats_path(logs), record)
    week = timedelta(days=7)
    assert run_report("weekly", logs, now=NOW - timedelta(minutes=150) + week).data["total"] == 1
    assert run_report("weekly", logs, now=NOW - timedelta(minutes=90) + week).data["total"] == 0


@pytest.mark.usefixtures("central_europe")
def test_ts_orders_alerts_across_the_dst_change(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    before = alert(ENG, "WARNING", 1000.0, NOW)
    before |= {"timestamp": "2026-10-25T02:59:00.000", "ts": "2026-10-25T00:59:00.000Z"}
    after = alert(ENG, "CRITICAL", 2200.0, NOW)  # clocks went back from 03:00 to 02:00
    after |= {"timestamp": "2026-10-25T02:01:00.000", "ts": "2026-10-25T01:01:00.000Z"}
    write(alerts_path(logs), before, after)
    result = run_report("growth", logs)
    assert [a["current_mb"] for a in result.data["alerts"]] == [1000.0, 2200.0]
    growth = result.data["agents"][ENG]
    assert (growth["elapsed_s"], growth["growth_mb_per_s"]) == (120.0, 10.0)


def test_health_reads_this_machine_by_default(logs: Path) -> None:
    result = run_report("health", logs, now=NOW)
    assert result.data["system"]["total_mb"] > 0
    assert result.data["verdict"] in {"OK", "WARNING", "CRITICAL"}
    assert result.data["last_24h"]["finished"] == 5
