"""The ``[cgroup]`` section: whether agents get memory cgroups, and the kernel ceiling's margin."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from supervisord.core.errors import ConfigError
from supervisord.core.units import MIB

Mode = Literal["auto", "off", "required"]
MODES: tuple[Mode, ...] = ("auto", "off", "required")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class CgroupSettings:
    """The ``[cgroup]`` section."""

    mode: Mode = "auto"
    # The kernel's ceiling sits this far above max_mb, so the daemon's SIGTERM comes first.
    hard_margin_pct: float = 10.0
    # Where the daemon's group is created; None: inside the daemon's own cgroup.
    root: str | None = None

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> CgroupSettings:
        """Parse and validate ``[cgroup]``; a ConfigError names key, value and what is allowed."""
        unknown = sorted(set(table) - {"mode", "hard_margin_pct", "root"})
        if unknown:
            raise ConfigError(
                f"[cgroup]: unknown key {unknown[0]!r}; allowed: mode, hard_margin_pct, root"
            )
        mode = table.get("mode", "auto")
        if mode not in MODES:
            raise ConfigError(
                f"cgroup.mode = {mode!r} is not allowed; use 'auto', 'off' or 'required'"
            )
        margin = table.get("hard_margin_pct", 10.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not margin >= 0:
            raise ConfigError(
                f"cgroup.hard_margin_pct = {margin!r} is not allowed; use a number >= 0"
            )
        root = table.get("root")
        if root is not None and (not isinstance(root, str) or not root.startswith("/")):
            raise ConfigError(
                f"cgroup.root = {root!r} is not allowed; use an absolute path inside a "
                "cgroup hierarchy, e.g. '/sys/fs/cgroup/claude-pm'"
            )
        return cls(mode=mode, hard_margin_pct=float(margin), root=root)

    def ceiling_bytes(self, max_mb: float) -> int:
        """The kernel's hard limit for an agent with ``max_mb`` (page-aligned, as the kernel)."""
        ceiling = int(max_mb * MIB * (1 + self.hard_margin_pct / 100))
        return ceiling - ceiling % PAGE_SIZE
