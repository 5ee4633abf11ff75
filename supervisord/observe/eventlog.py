"""The daemon's JSON-lines logs: alerts, stats and its own structured log.

Each file is appended to by one writer that rotates it by size and notices when it was
deleted or moved away (its inode changed or vanished); the next record then recreates the
file and directories, so a user who clears logs mid-run loses nothing written after that.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from supervisord.config.home import Home
from supervisord.core.events import AlertEvent, ExitEvent


class JsonLinesLog:
    """An append-only file of one JSON object a line, rotated as ``name.1`` ... ``name.N``."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self.failures = 0
        self._inode: tuple[int, int] | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        self.write_line(json.dumps(record, separators=(", ", ": "), default=str))

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode()
        try:
            fd = self._ensure_open()
            if self.max_bytes and os.fstat(fd).st_size + len(data) > self.max_bytes:
                fd = self._rotate()
            os.write(fd, data)
        except OSError as exc:
            # A full disk or an unwritable log directory must not stop enforcement: the
            # record goes to stderr (the journal, under systemd) and the next one tries again.
            self.close()
            self.failures += 1
            sys.stderr.write(f"cannot write {self.path}: {exc.strerror or exc}: {line}\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _ensure_open(self) -> int:
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    return self._fd
            except FileNotFoundError:
                pass
            self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(fd)
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        return fd

    def _rotate(self) -> int:
        self.close()
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        return self._ensure_open()


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
