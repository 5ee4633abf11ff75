"""The recent runs in subprocess-stats.jsonl, for the requests of launches that give none."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from supervisord.host.tail import tail_records

# Enough for thousands of runs, little enough to read at every start.
TAIL_BYTES = 4 * 1024 * 1024


def recent_runs(path: Path, tail_bytes: int = TAIL_BYTES) -> Iterator[tuple[str, float, bool]]:
    """(agent_type, peak_mb, aborted) of the last runs recorded, oldest first. Lines that are
    not records (cut by the tail, or damaged) are passed over: this is a hint, not a report."""
    for record in tail_records(path, tail_bytes):
        try:
            memory = record["memory_stats"]
            run = (str(record["agent_type"]), float(memory["peak_mb"]), bool(memory["aborted"]))
        except (ValueError, KeyError, TypeError):
            continue
        yield run
