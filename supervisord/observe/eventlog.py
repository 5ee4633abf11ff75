"""The daemon's JSON-lines logs: alerts, stats and its own structured log.

Each file is appended to by one writer that rotates it by size and notices when it was
deleted or moved away (its inode changed or vanished); the next record then recreates the
file and directories, so a user who clears logs mid-run loses nothing written after that.
The file handling is ``host.logfile.RotatingFile``, shared with the agents' output logs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from supervisord.config.home import Home
from supervisord.core.events import AlertEvent, ExitEvent
from supervisord.host.logfile import RotatingFile


class JsonLinesLog:
    """An append-only file of one JSON object a line, rotated as ``name.1`` ... ``name.N``."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._file = RotatingFile(path, max_bytes, backups)
        self.failures = 0

    def write(self, record: Mapping[str, Any]) -> None:
        self.write_line(json.dumps(record, separators=(", ", ": "), default=str))

    def write_line(self, line: str) -> None:
        try:
            self._file.write((line + "\n").encode())
        except OSError as exc:
            # A full disk or an unwritable log directory must not stop enforcement: the
            # record goes to stderr (the journal, under systemd) and the next one tries again.
            self.close()
            self.failures += 1
            sys.stderr.write(f"cannot write {self.path}: {exc.strerror or exc}: {line}\n")

    def close(self) -> None:
        self._file.close()


class _LineLogger:
    """structlog's final stage: hand the rendered line to a :class:`JsonLinesLog`."""

    def __init__(self, sink: JsonLinesLog, echo: TextIO | None) -> None:
        self._sink = sink
        self._echo = echo

    def msg(self, message: str) -> None:
        self._sink.write_line(message)
        if self._echo is not None:
            print(message, file=self._echo, flush=True)

    debug = info = warning = error = critical = exception = log = msg


def configure_daemon_log(home: Home, max_bytes: int, backups: int, *, echo: bool) -> JsonLinesLog:
    """Configure structlog once, for the daemon process: JSON lines into logs/supervisord.log."""
    sink = JsonLinesLog(home.daemon_log, max_bytes, backups)
    logger = _LineLogger(sink, sys.stderr if echo else None)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=lambda *_: logger,
        cache_logger_on_first_use=False,
    )
    return sink


class EventLog:
    """The two record files of CONTRACT.md."""

    def __init__(self, home: Home, max_bytes: int, backups: int) -> None:
        self.alerts = JsonLinesLog(home.alerts_log, max_bytes, backups)
        self.stats = JsonLinesLog(home.stats_log, max_bytes, backups)

    def alert(self, event: AlertEvent) -> None:
        self.alerts.write(event.record())

    def exit(self, event: ExitEvent) -> None:
        self.stats.write(event.record())

    def close(self) -> None:
        self.alerts.close()
        self.stats.close()
