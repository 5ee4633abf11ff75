"""How a process is known: by pid and start time, and by the variables every agent inherits."""

from __future__ import annotations

# (pid, start time in clock ticks since boot): a pid alone may be reused by a stranger.
Identity = tuple[int, int]

# Every process of an agent's tree inherits these; an orphan the daemon never saw in a tree
# is attributed by the first.
MARKER_ENV = "CLAUDE_PM_SUBPROCESS_ID"
TYPE_ENV = "CLAUDE_PM_AGENT_TYPE"
