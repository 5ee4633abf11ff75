"""How a run after the first continues the agent's session: its command, and its session id.

Coding agents resume a session by id (Claude Code: ``--session-id <uuid>`` on the first run,
``--resume <uuid>`` later). The daemon gives every agent a ``{session_uuid}`` of its own,
stable across runs; an agent that prints its own id has it captured from its output by
``session_pattern`` as ``{session_id}``. Placeholders are replaced literally (``str.replace``,
not ``str.format``), so other braces in arguments, JSON say, are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

PLACEHOLDERS = ("task", "subprocess_id", "run", "session_uuid", "session_id")
# A line longer than this is matched in pieces: output is not held without bound.
MAX_LINE = 4096


def expand(args: Sequence[str], values: Mapping[str, str]) -> tuple[str, ...]:
    """``args`` with each ``{name}`` of ``values`` replaced."""
    expanded = []
    for arg in args:
        for name, value in values.items():
            arg = arg.replace("{" + name + "}", value)
        expanded.append(arg)
    return tuple(expanded)


def needs(args: Sequence[str], name: str) -> bool:
    return any("{" + name + "}" in arg for arg in args)


def run_command(
    command: Sequence[str],
    resume_command: Sequence[str] | None,
    run: int,
    values: Mapping[str, str | None],
) -> tuple[str, ...]:
    """The command of run number ``run``: ``command`` for the first, ``resume_command`` after
    (when set), except that a resume needing a ``{session_id}`` not captured yet falls back
    to ``command``. ``values`` are the placeholders' values, None where there is none."""
    chosen = command
    if run > 1 and resume_command is not None:
        missing = [name for name, value in values.items() if value is None]
        if not any(needs(resume_command, name) for name in missing):
            chosen = resume_command
    known = {name: value for name, value in values.items() if value is not None}
    return expand(chosen, known)


class SessionCapture:
    """Finds ``pattern``'s group in an agent's output, fed in the chunks it is written in.

    Matched line by line (a line split across chunks is joined first); the last id printed
    wins, as an agent that starts a new session prints the new one.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern.encode())
        self.session_id: str | None = None
        self._partial = b""

    def feed(self, chunk: bytes) -> str | None:
        """The id found in this chunk, if any (also kept as ``session_id``)."""
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()[-MAX_LINE:]
        found = None
        for line in lines:
            if match := self.pattern.search(line[-MAX_LINE:]):
                found = match.group(1).decode(errors="replace")
        if found:
            self.session_id = found
        return found or None
