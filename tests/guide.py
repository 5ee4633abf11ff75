"""Pieces of the operational guide (docs/operational-guide.md), extracted verbatim.

The guide is what users follow; the tests run its commands and scripts exactly as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GUIDE = Path(__file__).parent.parent / "docs" / "operational-guide.md"
SEED = Path(__file__).parent.parent.parent / "shared" / "seed" / "000_8615060e0c44fbba.txt"


@dataclass(frozen=True)
class Block:
    heading: str
    language: str
    text: str


def blocks(path: Path = GUIDE) -> list[Block]:
    found: list[Block] = []
    heading = ""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```") and line[3:].strip():
            language = line[3:].strip()
            end = lines.index("```", i + 1)
            found.append(Block(heading, language, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return found


def under(heading: str, path: Path = GUIDE) -> list[Block]:
    """The code blocks under one heading, in order."""
    found = [b for b in blocks(path) if b.heading == heading]
    assert found, f"the guide has no code under {heading!r}"
    return found


def block(heading: str, path: Path = GUIDE) -> Block:
    (match,) = under(heading, path)
    return match


def python_c_commands(text: str) -> list[str]:
    """Every ``python -c "..."`` command, with its quoting intact (it may span lines)."""
    commands = []
    for match in re.finditer(r'python -c "((?:[^"\\]|\\.)*)"', text, re.S):
        commands.append(match.group(0))
    return commands


def heredocs(text: str) -> dict[str, str]:
    """``cat > NAME << 'EOF' ... EOF`` bodies, by file name."""
    return dict(re.findall(r"cat > (\S+) << 'EOF'\n(.*?\n)EOF\n", text, re.S))


def shell_lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]
