"""How an agent shares the host: what it asks of the budget, how it ranks, what shedding does.

Set per agent type (``[agents.<type>]``) and per launch, like the limits; unlike them these
never change once the agent runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from supervisord.core.errors import ConfigError
from supervisord.core.validate import number, positive

OnPressure = Literal["stop", "requeue"]
ON_PRESSURE: tuple[OnPressure, ...] = ("stop", "requeue")
PRIORITY_RANGE = (-1000, 1000)


@dataclass(frozen=True, slots=True)
class Scheduling:
    # MB the agent is expected to need; None: the p90 peak of its type's past runs, else
    # its warning_mb.
    request_mb: float | None = None
    # Higher runs first from the queue and is shed last.
    priority: int = 0
    # Shed under host pressure: "stop" ends it; "requeue" ends it and queues it again.
    on_pressure: OnPressure = "stop"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SCHEDULING_KEYS = frozenset(f.name for f in fields(Scheduling))


def apply_scheduling(base: Scheduling, values: Mapping[str, Any], where: str) -> Scheduling:
    """``base`` with the scheduling keys of ``values``; others are ignored. A bad value raises
    a ConfigError naming ``where.key``, the value and what is allowed."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key == "request_mb":
            changes[key] = None if value is None else positive(name, number(name, value))
        elif key == "priority":
            low, high = PRIORITY_RANGE
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"{name} = {value!r} is not allowed; give a whole number from {low} to {high}"
                )
            changes[key] = value
        elif key == "on_pressure":
            if value not in ON_PRESSURE:
                raise ConfigError(f"{name} = {value!r} is not allowed; use 'stop' or 'requeue'")
            changes[key] = value
    return replace(base, **changes)
