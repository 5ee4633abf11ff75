"""Where a daemon's files live: the home directory and the paths inside it."""

from __future__ import annotations

import hashlib
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

HOME_DIRNAME = ".claude-pm"
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def find_home(cwd: Path | None = None, environ: dict[str, str] | None = None) -> Path:
    """``$CLAUDE_PM_HOME``, else the nearest ``.claude-pm/`` walking up, else ``./.claude-pm``."""
    env = os.environ if environ is None else environ
    explicit = env.get("CLAUDE_PM_HOME")
    if explicit:
        return Path(explicit).expanduser().absolute()
    start = (cwd or Path.cwd()).absolute()
    for directory in (start, *start.parents):
        candidate = directory / HOME_DIRNAME
        if candidate.is_dir():
            return candidate
    return start / HOME_DIRNAME


def fallback_socket_path(home_root: Path) -> Path:
    """A short socket path derived from the home, so every client computes the same one."""
    digest = hashlib.sha256(str(home_root).encode()).hexdigest()[:16]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(tempfile.gettempdir()) / f"claude-pm-{os.getuid()}"
    return base / f"claude-pm-{digest}.sock"


@dataclass(frozen=True, slots=True)
class Home:
    """The layout of one daemon's home directory (see CONTRACT.md)."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config" / "supervisord.toml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def alerts_log(self) -> Path:
        return self.logs / "memory" / "memory-alerts.log"

    @property
    def stats_log(self) -> Path:
        return self.logs / "memory" / "subprocess-stats.jsonl"

    @property
    def daemon_log(self) -> Path:
        return self.logs / "supervisord.log"

    @property
    def agent_logs(self) -> Path:
        return self.logs / "agents"

    def agent_log(self, subprocess_id: str) -> Path:
        return self.agent_logs / f"{subprocess_id}.log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def default_socket(self) -> Path:
        return self.run / "supervisord.sock"

    @property
    def pid_file(self) -> Path:
        return self.run / "supervisord.pid"

    @property
    def state_file(self) -> Path:
        return self.run / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.run / "supervisord.lock"

    def socket_path(self, configured: str | None = None) -> Path:
        """The control socket: configured, else ``run/supervisord.sock`` when it fits in AF_UNIX.

        A home nested deeply enough to overflow sun_path gets a short path that is derived
        from the home, so the daemon and every client agree on it without asking anyone.
        """
        if configured:
            path = Path(configured).expanduser()
            return path if path.is_absolute() else self.root / path
        path = self.default_socket
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
            return path
        return fallback_socket_path(self.root)


def configured_socket(config_file: Path) -> str | None:
    """``[daemon] socket`` of the config file, if it names one. Read alone (clients need
    nothing else); a file the daemon would refuse gives None, as the daemon would not have
    started on it either."""
    try:
        document = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    daemon = document.get("daemon")
    socket = daemon.get("socket") if isinstance(daemon, dict) else None
    return socket if isinstance(socket, str) and socket else None
