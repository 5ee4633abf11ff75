"""The end of a log file, read without reading the rest: records are appended, so the
newest are last, and a file of gigabytes costs the same as a small one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_tail(path: Path, max_bytes: int) -> tuple[bytes, bool]:
    """The last ``max_bytes`` of ``path`` from a line start, and whether anything before them
    was left out. Raises ``OSError`` (``FileNotFoundError`` for a missing file)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        f.seek(start)
        data = f.read(size - start)
    if start == 0:
        return data, False
    # The first line began before the cut: it is a fragment, not a line.
    newline = data.find(b"\n")
    return (data[newline + 1 :] if newline >= 0 else b""), True


def last_lines(path: Path, count: int, max_bytes: int) -> tuple[list[str], bool]:
    """The last ``count`` lines (within ``max_bytes``), and whether earlier ones exist."""
    data, cut = read_tail(path, max_bytes)
    lines = data.decode(errors="replace").splitlines()
    return lines[-count:], cut or len(lines) > count


def tail_records(path: Path, max_bytes: int) -> Iterator[dict[str, Any]]:
    """The JSON objects among the last ``max_bytes`` of a JSON-lines file, oldest first;
    other lines (damaged, or being written) are passed over. A missing file has none."""
    try:
        data, _ = read_tail(path, max_bytes)
    except OSError:
        return
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            yield record
