"""``run/state.json``: what a restarted daemon needs to re-adopt the agents it left running.

Written atomically (a temporary file renamed over the old one) so a crash at any instant
leaves either the previous or the new state, never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """One live agent, as much as a new daemon needs to carry on supervising it."""

    subprocess_id: str
    agent_type: str
    command: list[str]
    pid: int
    start: int
    started_wall: str  # ISO 8601 UTC
    limits: dict[str, Any]
    overrides: dict[str, Any]
    owner_uid: int | None = None
    start_mb: float | None = None
    peak_mb: float = 0.0
    end_mb: float = 0.0
    warnings: list[str] = field(default_factory=list)
    level: str = "OK"
    ending: str | None = None
    members: list[list[int]] = field(default_factory=list)


def as_dict(record: AgentRecord) -> dict[str, Any]:
    return asdict(record)


def save(path: Path, daemon_pid: int, agents: list[dict[str, Any]]) -> None:
    """Write the state (agents as ``as_dict`` made them); blocks: call it from a thread."""
    document = {"version": STATE_VERSION, "daemon_pid": daemon_pid, "agents": agents}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # No fsync: the file must survive the daemon's crash, which the page cache does; after
    # the machine's crash there is no agent left to re-adopt anyway. The rename keeps it whole.
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, separators=(",", ":"))
    os.replace(tmp, path)


def load(path: Path) -> tuple[list[AgentRecord], list[str]]:
    """The records in ``path`` and a problem per entry that could not be read."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], []
    except (OSError, ValueError) as exc:
        return [], [f"{path}: unreadable ({exc}); no agents re-adopted from it"]
    if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
        return [], [f"{path}: not a version {STATE_VERSION} state file; ignored"]
    records: list[AgentRecord] = []
    problems: list[str] = []
    for n, entry in enumerate(document.get("agents", [])):
        try:
            records.append(AgentRecord(**entry))
        except TypeError as exc:
            problems.append(f"{path}: agent entry {n} is malformed ({exc}); skipped")
    return records, problems
