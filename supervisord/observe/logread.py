"""Reading the record logs back: rotated files oldest first, each line parsed or named as bad.

A damaged log never raises: a line that is not a usable record is reported and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

ALERTS_FILE = Path("memory", "memory-alerts.log")
STATS_FILE = Path("memory", "subprocess-stats.jsonl")


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
    run: int = 1  # which run of the agent (from 1); records from before restarts have none

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
ALERT_FIELDS = tuple(
    f.name for f in dataclasses.fields(AlertRecord) if f.name not in {"at", "instant"}
)
R = TypeVar("R", StatRecord, AlertRecord)


@dataclasses.dataclass(frozen=True, slots=True)
class Log(Generic[R]):
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


def local_naive(dt: datetime) -> datetime:
    return dt if dt.tzinfo is None else dt.astimezone().replace(tzinfo=None)


def _times(obj: dict[str, Any]) -> tuple[datetime, datetime]:
    raw = _text(obj, "timestamp")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise _BadRecord(f"field timestamp is not an ISO 8601 time ({raw!r:.40})") from None
    at = local_naive(parsed)
    instant = at.astimezone()  # a naive time is local, as the contract writes it
    ts = obj.get("ts")
    if isinstance(ts, str):
        try:
            utc = datetime.fromisoformat(ts)
            instant = utc if utc.tzinfo else utc.replace(tzinfo=UTC)
        except ValueError:
            pass  # ts is optional; timestamp already gives the instant
    return at, instant


def _run(obj: dict[str, Any]) -> int:
    value = obj.get("run")
    # Not a reason to skip the line: the rest of the record is still a run that happened.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return 1
    return value


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
        run=_run(obj),
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


def _load(path: Path, parse: Callable[[dict[str, Any]], R]) -> Log[R]:
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
    return Log(tuple(records), tuple(problems), note)


def load_stats(logs_dir: Path) -> Log[StatRecord]:
    return _load(logs_dir / STATS_FILE, _parse_stat)


def load_alerts(logs_dir: Path) -> Log[AlertRecord]:
    return _load(logs_dir / ALERTS_FILE, _parse_alert)


# ---------------------------------------------------------------------------------- arithmetic
