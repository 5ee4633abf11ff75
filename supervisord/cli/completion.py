"""Shell completion: the script ``claude-pm completion SHELL`` prints, and the completers that
offer subprocess ids from the running daemon and from the agents' output logs.

``main`` imports this on every run, and a TAB runs ``claude-pm`` once per keystroke, so only
the standard library, argcomplete and the core are imported up here: the home and the client
are imported by the completers that need them, when they run.
"""

from __future__ import annotations

import argparse
from typing import Any

# From the modules that define them: argcomplete's __init__ does not re-export them for mypy.
from argcomplete.io import debug
from argcomplete.shell_integration import shellcode

from supervisord.core.errors import DaemonNotRunning, SupervisordError

SHELLS = ("bash", "zsh", "fish")
# Per socket operation: the user is waiting at a TAB, and a hung daemon must not hang the shell.
TIMEOUT_S = 0.5
INSTALL = """\
install (once):
  bash  add to ~/.bashrc:  source <(claude-pm completion bash)
        or: claude-pm completion bash > ~/.local/share/bash-completion/completions/claude-pm
  zsh   claude-pm completion zsh > ~/.zfunc/_claude-pm
        with fpath=(~/.zfunc $fpath) before compinit in ~/.zshrc
        or, after compinit in ~/.zshrc:  eval "$(claude-pm completion zsh)"
  fish  claude-pm completion fish > ~/.config/fish/completions/claude-pm.fish

subprocess ids are completed from the running daemon (agents of yours running or waiting)
and, for logs and report growth, from the output logs."""

# Candidate -> description (zsh and fish show it beside the candidate; bash does not).
Candidates = dict[str, str]


def script(shell: str) -> str:
    """What the shell sources to complete ``claude-pm``."""
    return shellcode(["claude-pm"], shell=shell)


def running(**_: Any) -> Candidates:
    """``stats``, ``stop``, ``kill``, ``restart``, ``unwatch``: the caller's running agents."""
    (status,) = _ask("status") or ({},)
    return _running(status)


def waiting(**_: Any) -> Candidates:
    """``cancel``: launches waiting for room, for their restart or for other agents."""
    (queue,) = _ask("queue") or ({},)
    return _waiting(queue)


def logged(**_: Any) -> Candidates:
    """``logs``: agents with an output log (ended ones too), and the running ones."""
    return {**_logs(), **running()}


def growth(parsed_args: argparse.Namespace | None = None, **_: Any) -> Candidates:
    """``report growth ID``; the other reports take no id."""
    return logged() if getattr(parsed_args, "name", None) == "growth" else {}


def after(prefix: str, **_: Any) -> Candidates:
    """``launch --after ID[,ID...]``: agents running or waiting, as the id after the last comma."""
    status, queue = _ask("status", "queue") or ({}, {})
    head, comma, _tail = prefix.rpartition(",")
    ids = {**_running(status), **_waiting(queue)}
    return {f"{head}{comma}{id_}": description for id_, description in ids.items()}


def _ask(*commands: str) -> list[dict[str, Any]]:
    """The daemon's answers to ``commands``, or none: a daemon stopped, hung or refusing, or a
    home that cannot be read, means no candidates (``_ARC_DEBUG=1`` shows why), never a
    traceback at the prompt; the command itself, once run, says what is wrong."""
    from supervisord.config.home import Home, find_home
    from supervisord.control.client import Client, resolve_socket

    try:
        with Client(resolve_socket(Home(find_home())), timeout_s=TIMEOUT_S) as client:
            return [dict(client.request(command)) for command in commands]
    except DaemonNotRunning:
        return []
    except (SupervisordError, OSError, ValueError, TypeError) as exc:
        debug(f"claude-pm: no subprocess ids from the daemon: {exc!r}")
        return []


def _running(status: dict[str, Any]) -> Candidates:
    return {
        row["subprocess_id"]: f"{row.get('agent_type')}, {row.get('current_mb')} MB, "
        f"{row.get('status')}"
        for row in status.get("agents", [])
        if row.get("subprocess_id")
    }


def _waiting(queue: dict[str, Any]) -> Candidates:
    rows = [
        *({**row, "state": "queued"} for row in queue.get("queue", [])),
        *queue.get("restarting", []),
        *queue.get("waiting", []),
    ]
    return {
        row["subprocess_id"]: f"{row.get('agent_type')}, {row.get('state')}"
        for row in rows
        if row.get("subprocess_id")
    }


def _logs() -> Candidates:
    from supervisord.config.home import Home, find_home

    try:
        paths = sorted(Home(find_home()).agent_logs.glob("*.log"))
    except OSError as exc:
        debug(f"claude-pm: no output logs: {exc!r}")
        return {}
    return {path.name.removesuffix(".log"): "output log" for path in paths}
