"""An append-only file that rotates by size and survives being deleted or moved away.

Shared by the daemon's JSON-lines records (``observe.eventlog``) and the agents' output logs
(``host.agentlog``). Before each write the path is checked against the open descriptor's
inode: when the file was deleted or moved away (log clearing, logrotate without
copytruncate), the write recreates it, directories included, so nothing written afterwards
is lost. Rotation keeps ``name.1`` ... ``name.N`` and cuts at a line end when one fits, so a
line is never split across two files unless it alone is longer than ``max_bytes``.

Writes raise ``OSError``; callers decide where a failed write goes (never into the daemon).
"""

from __future__ import annotations

import os
from pathlib import Path


def _fitting(data: bytes | memoryview, room: int, empty: bool) -> int:
    """How many leading bytes of ``data`` go into the current file (0: rotate first)."""
    if len(data) <= room:
        return len(data)
    cut = bytes(data[:room]).rfind(b"\n") + 1 if room > 0 else 0
    if cut or not empty:
        return cut
    # A line longer than the whole file: it gets a file of its own rather than being cut.
    nl = bytes(data).find(b"\n", room)
    return nl + 1 if nl >= 0 else len(data)


class RotatingFile:
    """Bytes appended to ``path``, rotated as ``name.1`` ... ``name.N`` past ``max_bytes``.

    ``max_bytes`` 0 never rotates; ``backups`` 0 deletes instead of keeping a backup. With
    ``owner`` (uid, gid), every file it creates is given to that user (a root daemon writing
    the log of another user's agent, who may read it).
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        *,
        owner: tuple[int, int] | None = None,
        mode: int = 0o644,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.owner = owner
        self.mode = mode
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def write(self, data: bytes) -> None:
        fd = self.open()
        if not self.max_bytes:
            _write_all(fd, memoryview(data))
            return
        view = memoryview(data)
        size = os.fstat(fd).st_size
        while view:
            n = _fitting(view, self.max_bytes - size, size == 0)
            if n == 0:
                fd, size = self._rotate(), 0
                continue
            _write_all(fd, view[:n])
            view, size = view[n:], size + n

    def open(self) -> int:
        """The descriptor of the file now at ``path``, (re)created if it is not the one open."""
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    return self._fd
            except FileNotFoundError:
                pass
            self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            if self.owner is not None:
                os.fchown(fd, *self.owner)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
        return self.open()


def _write_all(fd: int, data: memoryview) -> None:
    # A regular file takes a write whole except at a full disk; then os.write raises
    # on the retry, so the loop cannot spin.
    while data:
        data = data[os.write(fd, data) :]
