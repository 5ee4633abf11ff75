"""Agents' output: a FIFO per agent, drained by the daemon into a rotating log file.

The agent's stdout and stderr are one descriptor on a named FIFO, ``run/agents/<id>.fifo``;
the daemon reads the other side on its event loop (``anyio.wait_readable`` + ``os.read``,
no thread per agent) and appends what it reads to ``logs/agents/<id>.log`` through a
:class:`~supervisord.host.logfile.RotatingFile`: rotated at ``[daemon] agent_log_max_bytes``,
recreated when deleted or moved away. The agent sees a pipe and nothing else.

Why a FIFO opened ``O_RDWR`` on the agent's side, rather than a plain pipe: agents outlive
their daemon (``shutdown --leave-agents``, a crash). With a plain pipe the reader dies with
the daemon, and the agent's next write is SIGPIPE, which kills it. Here the agent's own
descriptor also counts as a reader, so its writes never fail: while no daemon runs they go
into the kernel's pipe buffer (64 KiB), and only once that is full does the agent block,
until the next daemon re-opens the FIFO by name (:meth:`AgentOutput.reopen`) and drains it.
Nothing is lost and nothing is killed; the cost is that an agent left with no daemon for
good stalls after 64 KiB of output. The daemon never holds a writer, so the read side sees
EOF exactly when the last process of the tree holding the descriptor is gone. What is still
in the buffer when that happens with no daemon running is discarded by the kernel.

Writing the log never raises into the daemon: a failed write goes to stderr (the journal),
like the JSON-lines records, and draining carries on so the agent is never blocked by it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from supervisord.config.home import Home
from supervisord.config.settings import DaemonSettings
from supervisord.host.logfile import RotatingFile

# One pipe buffer's worth: a read takes all there is.
CHUNK = 65536
# finish() runs on the event loop: a writer that escaped the tree must not keep it there.
_FINISH_READS = 16
_EOF, _EMPTY, _COPIED = range(3)


@dataclass(frozen=True, slots=True)
class OutputPlace:
    """Where agents' FIFOs and logs live and how the logs rotate (the home and ``[daemon]``)."""

    home: Home
    max_bytes: int
    backups: int

    @classmethod
    def of(cls, home: Home, daemon: DaemonSettings) -> OutputPlace:
        return cls(home, daemon.agent_log_max_bytes, daemon.log_backups)

    def fifo(self, subprocess_id: str) -> Path:
        return self.home.run / "agents" / f"{subprocess_id}.fifo"

    def log(self, path: Path, owner: tuple[int, int] | None) -> RotatingFile:
        return RotatingFile(path, self.max_bytes, self.backups, owner=owner)

    def forget(self, subprocess_id: str) -> None:
        """Remove the FIFO of an agent that ended while no daemon ran (it has no writer)."""
        with contextlib.suppress(OSError):
            self.fifo(subprocess_id).unlink()


class AgentOutput:
    """The daemon's side of one agent's output: the FIFO's read end and the log it feeds.

    ``drain`` runs as a task until EOF; ``finish`` (the tree is gone) copies what is left at
    once, so the stats record never waits for the next event-loop turn to find the tail.
    """

    def __init__(self, fifo: Path | None, read_fd: int, log: RotatingFile | None) -> None:
        self.fifo = fifo
        self._fd = read_fd
        self._log = log
        self._scope: anyio.CancelScope | None = None
        self.failures = 0
        # Sees every chunk as it is written to the log (the session id is found there).
        self.tap: Callable[[bytes], object] | None = None

    @classmethod
    def detached(cls) -> AgentOutput:
        """No output to drain (an agent adopted from a daemon that did not use FIFOs)."""
        return cls(None, -1, None)

    @classmethod
    def create(
        cls, place: OutputPlace, subprocess_id: str, log_path: Path, owner: tuple[int, int] | None
    ) -> tuple[AgentOutput, int]:
        """A new FIFO and log (created now, given to ``owner``); returns the agent's end.

        The caller passes the agent's end to the child as stdout and stderr and closes its
        own copy at once (else EOF never comes). Raises ``OSError``; :meth:`discard` undoes.
        """
        fifo = place.fifo(subprocess_id)
        try:
            os.mkfifo(fifo, 0o600)
        except FileNotFoundError:  # The first agent of this home (run/ itself must exist).
            fifo.parent.mkdir(mode=0o700, exist_ok=True)
            os.mkfifo(fifo, 0o600)
        read_fd = agent_fd = -1
        log = place.log(log_path, owner)
        try:
            # The reader first: opening the agent's end then counts as a new writer, so the
            # read side is told (POLLHUP) when the last writer goes.
            read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            agent_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
            if owner is not None:
                os.fchown(agent_fd, *owner)  # so a later daemon knows whose log it recreates
            log.open()
        except OSError:
            output = cls(fifo, read_fd, log)
            output.discard()
            if agent_fd >= 0:
                os.close(agent_fd)
            raise
        return cls(fifo, read_fd, log), agent_fd

    @classmethod
    def reopen(cls, place: OutputPlace, subprocess_id: str) -> AgentOutput:
        """The output of an agent a previous daemon left running: its FIFO, opened again."""
        fifo = place.fifo(subprocess_id)
        try:
            read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return cls.detached()
        st = os.fstat(read_fd)
        if not stat.S_ISFIFO(st.st_mode):
            os.close(read_fd)
            return cls.detached()
        # A writer opened and closed after our reader: without one, some kernels never
        # report POLLHUP to a reader that arrived after every writer, and EOF would go unseen.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        owner = None if st.st_uid == os.geteuid() else (st.st_uid, st.st_gid)
        return cls(fifo, read_fd, place.log(place.home.agent_log(subprocess_id), owner))

    async def drain(self) -> None:
        """Copy the agent's output into its log until every writer is gone (EOF)."""
        if self._fd < 0:
            return
        with anyio.CancelScope() as self._scope:
            try:
                while self._copy() != _EOF:
                    await anyio.wait_readable(self._fd)
                self._ended()  # No writer is left, nor can one appear: nobody needs the name.
            finally:
                # Cancelled (daemon exit, or finish()): the FIFO stays for the next daemon.
                self._close()

    def finish(self) -> None:
        """The agent's tree is gone: copy what its pipe still holds, now."""
        # It leaves run/state.json now, so no later daemon would reopen the FIFO by name.
        self._ended()
        for _ in range(_FINISH_READS):
            copied = self._copy() if self._fd >= 0 else _EOF
            if copied == _EOF:
                if self._scope is not None:
                    self._scope.cancel()  # the drain task closes the fd once it unwinds
                else:
                    self._close()
                return
            if copied == _EMPTY:
                return  # A writer outside the tree still has it: the drain goes on to EOF.

    def discard(self) -> None:
        """Undo :meth:`create` for an agent that never started: no FIFO, no empty log."""
        self._ended()
        self._close()
        if self._log is not None:
            with contextlib.suppress(OSError):
                if self._log.path.stat().st_size == 0:
                    self._log.path.unlink()

    def _copy(self) -> int:
        try:
            data = os.read(self._fd, CHUNK)
        except BlockingIOError:
            return _EMPTY
        except OSError:
            return _EOF
        if not data:
            return _EOF
        if self.tap is not None:
            self.tap(data)
        self._write(data)
        return _COPIED

    def note(self, line: str) -> None:
        """A line of the daemon's own in the agent's log (between runs, say)."""
        self._write(line.encode() + b"\n")

    def _write(self, data: bytes) -> None:
        if self._log is not None:
            try:
                self._log.write(data)
            except OSError as exc:
                self._log.close()
                self.failures += 1
                text = data.decode(errors="replace")
                sys.stderr.write(f"cannot write {self._log.path}: {exc.strerror or exc}: {text}")

    def _ended(self) -> None:
        if self.fifo is not None:
            with contextlib.suppress(OSError):
                self.fifo.unlink()
            self.fifo = None

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._log is not None:
            self._log.close()
