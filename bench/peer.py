"""The leak race's peer baseline: the same leaker under supervisord with superlance's memmon.

A supervisord (``-n``, a config in a short temp dir: unix socket, the leaker program, and
memmon as an event listener on TICK_5 with ``-c -p leaker=<limit>MB``) is started for each
run. When memmon finds the program over its limit it restarts it (``stopProcess`` then
``startProcess``); only the first kill counts, so supervisord is stopped as soon as the
observer sees the first tree gone. The SIGTERM time is supervisord's own debug log line
``killing leaker (pid N) process group with signal SIGTERM``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PYTHON,
    clean_env,
    log,
    short_tmpdir,
    stop_process,
    wait_until,
)

BIN = Path(PYTHON).parent
SUPERVISORD = BIN / "supervisord"
MEMMON = BIN / "memmon"
KILL_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ killing leaker \(pid (\d+)\) "
    r"(?:process group )?with signal SIGTERM"
)
MEMMON_NOTE = (
    "memmon -c: on each TICK_5 event it runs `ps ax -o pid=,ppid=,rss=` and sums the RSS of "
    "the program's process and of its descendants found by ppid (without -c only the "
    "program's own process counts, and a leak in a child is never seen; with -c a descendant "
    "that setsid/double-forks is reparented to init and escapes too). TICK_5 fires on "
    "wall-clock 5 s boundaries, noticed by supervisord's 1 s poll loop, so a check can come "
    "up to ~6 s after the crossing. On a hit memmon restarts the program; stopasgroup and "
    "killasgroup are set here so the SIGTERM reaches the child of the tree variant "
    "(supervisord's default signals only the program's own pid, leaving the growing child "
    "alive)."
)


def ensure_installed() -> str | None:
    """supervisord and memmon in this venv, installed with pip when missing; None when ready,
    else why not (no network, say): the leak race then reports the baseline as missing."""
    if SUPERVISORD.exists() and MEMMON.exists():
        return None
    log("leak: installing supervisor and superlance (the peer baseline) with pip")
    done = subprocess.run(
        [PYTHON, "-m", "pip", "install", "--quiet", "supervisor", "superlance"],
        capture_output=True,
        text=True,
        check=False,
    )
    if SUPERVISORD.exists() and MEMMON.exists():
        return None
    return f"pip install supervisor superlance failed: {done.stderr.strip()[-300:]}"


@dataclass(frozen=True, slots=True)
class PeerRun:
    pid: int
    t_sigterm: float | None
    memmon_saw_mb: list[float]


# What every supervisord of the benchmarks shares; {options} adds [supervisord] lines.
HEADER = """\
[unix_http_server]
file={dir}/s.sock

[supervisord]
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={dir}
nodaemon=true
{options}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

"""
CONFIG = """\
[supervisorctl]
serverurl=unix://{dir}/s.sock

[program:leaker]
command={command}
autostart=true
autorestart=false
startsecs=0
stopasgroup=true
killasgroup=true
stopwaitsecs=2
redirect_stderr=true
stdout_logfile={dir}/leaker.log

[eventlistener:memmon]
command={memmon} -c -p leaker={limit_mb}MB
events=TICK_5
stderr_logfile={dir}/memmon.log
"""


class Supervisord:
    """One supervisord with the leaker and memmon; a context manager that always stops it."""

    def __init__(self, command: list[str], limit_mb: int, tag: str) -> None:
        self.dir = short_tmpdir("mm")
        self.tag = tag
        (self.dir / "supervisord.conf").write_text(
            HEADER.format(dir=self.dir, options="loglevel=debug")
            + CONFIG.format(
                dir=self.dir, command=" ".join(command), memmon=MEMMON, limit_mb=limit_mb
            )
        )
        with open(self.dir / "stderr", "wb") as out:
            self.proc = subprocess.Popen(
                [str(SUPERVISORD), "-n", "-c", str(self.dir / "supervisord.conf")],
                cwd=self.dir,
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

    def leaker_pid(self, timeout_s: float = 15.0) -> int:
        """The program's pid, once it has exec'd the leaker (before that it is a fork)."""
        found: list[int] = []

        def started() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisord exited: {self._stderr()}")
            for pid in _children(self.proc.pid):
                if self.tag in _cmdline(pid):
                    found.append(pid)
                    return True
            return False

        wait_until(started, timeout_s, "supervisord to start the leaker", poll_s=0.002)
        return found[0]

    def sigterm_time(self, pid: int) -> float | None:
        log_file = self.dir / "supervisord.log"
        if not log_file.exists():
            return None
        for line in log_file.read_text(errors="replace").splitlines():
            match = KILL_LINE.match(line)
            if match and int(match.group(3)) == pid:
                local = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
                return local + int(match.group(2)) / 1000
        return None

    def memmon_readings(self) -> list[float]:
        """What memmon measured at each check (bytes in its log), in MiB."""
        path = self.dir / "memmon.log"
        if not path.exists():
            return []
        found = re.findall(r"RSS of leaker:leaker is (\d+)", path.read_text(errors="replace"))
        return [round(int(n) / 2**20, 1) for n in found]

    def stop(self) -> None:
        # SIGTERM: supervisord stops the restarted leaker and memmon, then exits.
        stop_process(self.proc, 30)
        # Whatever carries our tag and survived (it should not) is killed by pid.
        for pid in _tagged(self.tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Supervisord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stderr(self) -> str:
        return (self.dir / "stderr").read_text(errors="replace")[-1000:]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(w) for w in f.read().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tagged(tag: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and tag in _cmdline(int(name)):
            pids.append(int(name))
    return pids
