"""Wall-clock stamps for records: the guide's local ``timestamp`` and a UTC ``ts``."""

from __future__ import annotations

from datetime import UTC, datetime


def timestamps(at: datetime | None = None) -> dict[str, str]:
    """``timestamp`` in local time without offset (the guide compares it with now()), ``ts`` UTC."""
    at = at or datetime.now(UTC)
    local = at.astimezone().replace(tzinfo=None)
    return {
        "timestamp": local.isoformat(timespec="milliseconds"),
        "ts": at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z",
    }
