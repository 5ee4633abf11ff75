"""The ``[host]`` section: the memory budget every agent shares, and the admission queue."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisord.core.errors import ConfigError
from supervisord.core.validate import integer, number, positive, reject_unknown

HOST_KEYS = ("budget_mb", "reserve_mb", "pressure_psi_some_avg10", "max_queued")


@dataclass(frozen=True, slots=True)
class HostSettings:
    """None: follow the host (``core.budget.resolve``); PSI is then not watched."""

    budget_mb: float | None = None
    reserve_mb: float | None = None
    pressure_psi_some_avg10: float | None = None
    # Launches that may wait at once; one more is refused (queue_full).
    max_queued: int = 1000

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> HostSettings:
        """Parse and validate ``[host]``; a ConfigError names key, value and what is allowed."""
        reject_unknown("[host]", table, HOST_KEYS)
        values: dict[str, Any] = {}
        if "budget_mb" in table:
            values["budget_mb"] = positive(
                "host.budget_mb", number("host.budget_mb", table["budget_mb"])
            )
        if "reserve_mb" in table:
            values["reserve_mb"] = positive(
                "host.reserve_mb", number("host.reserve_mb", table["reserve_mb"]), allow_zero=True
            )
        if "pressure_psi_some_avg10" in table:
            name = "host.pressure_psi_some_avg10"
            psi = positive(name, number(name, table["pressure_psi_some_avg10"]))
            if psi > 100:
                raise ConfigError(f"{name} = {psi:g} is not allowed; give a percentage, 0 to 100")
            values["pressure_psi_some_avg10"] = psi
        if "max_queued" in table:
            values["max_queued"] = integer("host.max_queued", table["max_queued"], minimum=1)
        return cls(**values)
