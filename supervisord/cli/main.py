"""``claude-pm``: argv in, a handler (``handlers``) run, its exit code out.

Exit codes: 0 success, 1 the operation failed, 2 usage error, 3 daemon not running. Only the
``cli`` package touches argv, stdout and exit codes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence

import argcomplete

from supervisord import __version__
from supervisord.cli import completion
from supervisord.core.errors import ConfigError, DaemonNotRunning, SupervisordError, UsageError
from supervisord.core.kinds import Level

# observe.reports.REPORTS, which imports psutil and more than a TAB should wait for
# (tests/test_completion.py keeps the two equal).
REPORTS = ("health", "growth", "leaks", "weekly", "thresholds")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:
        # A TAB in bash, zsh or fish runs us with _ARGCOMPLETE set: this prints the candidates
        # and exits, before the handlers (and all they import) are loaded. Options only once
        # a "-" is typed, so `stop <TAB>` offers ids, not --help and --json among them.
        argcomplete.autocomplete(parser, always_complete_options=False)
    from supervisord.cli import handlers as h
    from supervisord.cli.handlers import FAILED, NOT_RUNNING, OK, USAGE, Handler, error

    args_list = list(sys.argv[1:] if argv is None else argv)
    # `launch TYPE [OPTIONS] -- CMD ...`: everything after `--` is the agent's command, verbatim,
    # and the options before it are ours (argparse.REMAINDER would swallow them into CMD).
    command_tail: list[str] | None = None
    if args_list[:1] in (["launch"], ["run"]) and "--" in args_list:
        split = args_list.index("--")
        args_list, command_tail = args_list[:split], args_list[split + 1 :]
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help.
        return int(exc.code or 0)
    if command_tail is not None:
        args.cmd = [*args.cmd, *command_tail]
    handler: Handler = getattr(h, f"cmd_{args.command}")
    try:
        return handler(args)
    except DaemonNotRunning as exc:
        error(str(exc))
        return NOT_RUNNING
    except (UsageError, ConfigError) as exc:
        error(str(exc))
        return USAGE
    except SupervisordError as exc:
        error(str(exc))
        return FAILED
    except KeyboardInterrupt:
        return FAILED
    except BrokenPipeError:  # `claude-pm events --follow | head` closed our stdout.
        return OK


def daemon_main() -> int:
    """``claude-pm-supervisord``: identical to ``claude-pm daemon``."""
    return main(["daemon", *sys.argv[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claude-pm",
        description="Supervise AI-agent process trees and stop runaway memory.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Each command's handler is handlers.cmd_COMMAND, looked up once parsed (see main).
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text)

    _daemon_commands(add)
    _agent_commands(add)
    _log_commands(add)
    _control_commands(add)
    return parser


Add = Callable[[str, str], argparse.ArgumentParser]


def _daemon_commands(add: Add) -> None:
    p = add("init", "create the home and config; start the daemon if not running")
    p.add_argument("--no-start", action="store_true", help="only create the home and config")
    p = add("daemon", "run the daemon in the foreground")
    p.add_argument("--detach", action="store_true", help="fork into the background once ready")
    p = add("status", "daemon, thresholds, system memory and agents")
    p.add_argument("--json", action="store_true")


def _agent_commands(add: Add) -> None:
    p = add("launch", "launch an agent under supervision; prints its subprocess_id")
    p.add_argument("agent_type", metavar="TYPE")
    _limit_options(p)
    p.add_argument("--cwd", metavar="DIR")
    p.add_argument("--env", action="append", default=[], metavar="K=V", type=_env_pair)
    p.add_argument("--task", help="task text for the type's [agents.TYPE] command template")
    p.add_argument(
        "--force", action="store_true", help="start now, even past the host's memory budget"
    )
    p.add_argument(
        "--request-mb", type=_positive, metavar="N", help="MB it is expected to need (admission)"
    )
    p.add_argument(
        "--priority", type=int, metavar="N", help="higher is admitted first, shed last (default 0)"
    )
    p.add_argument("--on-pressure", choices=["stop", "requeue"], help="when shed for host pressure")
    p.add_argument(
        "--no-queue", action="store_true", help="refuse, rather than wait, if it does not fit"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait (through the queue and its restarts) for it to end; print its record",
    )
    after = p.add_argument(
        "--after",
        action="append",
        default=[],
        type=_ids,
        metavar="ID[,ID...]",
        help="start once these agents have ended with exit code 0",
    )
    _complete(after, completion.after)
    _restart_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("cmd", nargs="*", metavar="-- CMD [ARG ...]")
    _running_agent_commands(add)


def _running_agent_commands(add: Add) -> None:
    p = add("stats", "statistics of all agents, or of one")
    _complete(p.add_argument("subprocess_id", nargs="?", metavar="ID"), completion.running)
    p.add_argument(
        "--pss", action="store_true", help="add each tree's PSS (reads every smaps_rollup: slow)"
    )
    p.add_argument("--json", action="store_true")
    p = add("stop", "stop an agent: SIGTERM its tree, SIGKILL what remains after grace")
    _complete(p.add_argument("subprocess_id", metavar="ID"), completion.running)
    p.add_argument("--grace", type=_non_negative, metavar="S")
    p.add_argument("--json", action="store_true")
    p = add("kill", "SIGKILL an agent's whole tree now")
    _complete(p.add_argument("subprocess_id", metavar="ID"), completion.running)
    p.add_argument("--json", action="store_true")
    p = add("restart", "end an agent's run (usual escalation); start its next now")
    _complete(p.add_argument("subprocess_id", metavar="ID"), completion.running)
    p.add_argument("--grace", type=_non_negative, metavar="S")
    p.add_argument("--json", action="store_true")
    p = add("run", "run CMD here, in the foreground, supervised like a launched agent")
    p.add_argument("--type", dest="agent_type", metavar="TYPE", help="default: CMD's name")
    _limit_options(p)
    p.add_argument("cmd", nargs="*", metavar="-- CMD [ARG ...]")
    p = add("watch", "supervise a tree already running (yours): limits, records")
    p.add_argument("pid", type=int, metavar="PID")
    p.add_argument("--type", dest="agent_type", metavar="TYPE", help="default: its command's name")
    _limit_options(p)
    p.add_argument("--json", action="store_true")
    p = add("unwatch", "stop supervising a watched tree, without a signal")
    _complete(p.add_argument("subprocess_id", metavar="ID"), completion.running)
    p.add_argument("--json", action="store_true")
    p = add("queue", "launches waiting for room, for their restart, or for others")
    p.add_argument("--json", action="store_true")
    p = add("cancel", "take a waiting launch out of the queue")
    _complete(p.add_argument("subprocess_id", metavar="ID"), completion.waiting)
    p.add_argument("--json", action="store_true")


def _limit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warning-mb", type=_positive, metavar="N")
    p.add_argument("--critical-mb", type=_positive, metavar="N")
    p.add_argument(
        "--max-mb", type=_max_mb, metavar="N", help='MB, or "auto" (90%% of the enclosing limit)'
    )
    p.add_argument("--timeout", type=_positive, metavar="S", help="seconds before it is stopped")
    p.add_argument("--grace", type=_non_negative, metavar="S", help="SIGTERM to SIGKILL, seconds")


def _restart_options(p: argparse.ArgumentParser) -> None:
    """``launch``'s restart policy (over its type's ``[agents.TYPE]``)."""
    p.add_argument(
        "--restart",
        choices=["no", "on-failure", "on-abort", "always"],
        help="which ends bring it back (on-abort: ended for memory, time or host pressure)",
    )
    p.add_argument("--restart-delay", type=_non_negative, metavar="S", help="first delay (1)")
    p.add_argument("--restart-backoff", type=_factor, metavar="F", help="delay factor (2)")
    p.add_argument("--restart-delay-max", type=_non_negative, metavar="S", help="cap (60)")
    p.add_argument("--restart-limit", type=_count, metavar="N", help="runs within window (5)")
    p.add_argument("--restart-window", type=_positive, metavar="S", help="seconds (300)")
    p.add_argument("--restart-reset", type=_non_negative, metavar="S", help="healthy run (60)")
    p.add_argument(
        "--resume-command",
        type=_words,
        metavar="CMD",
        help="command of each run after the first, shell-quoted ({session_uuid}, {session_id})",
    )
    p.add_argument(
        "--session-pattern", metavar="REGEX", help="one group: the session id in its output"
    )


def _log_commands(add: Add) -> None:
    p = add("events", "alert history; --follow streams alerts and exits live")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--level", type=str.upper, choices=[Level.WARNING.name, Level.CRITICAL.name])
    p.add_argument("--json", action="store_true")
    p = add("logs", "an agent's output")
    _complete(p.add_argument("subprocess_id", metavar="ID"), completion.logged)
    p.add_argument("--follow", "-f", action="store_true")
    p = add("report", "analyses of the logs (no daemon needed)")
    p.add_argument("name", choices=REPORTS)
    growth = p.add_argument("subprocess_id", nargs="?", metavar="ID", help="for growth: one agent")
    _complete(growth, completion.growth)
    p.add_argument("--json", action="store_true")


def _control_commands(add: Add) -> None:
    add("reload", "re-read config and CLAUDE_PM_* variables; apply to running agents")
    p = add("shutdown", "stop the daemon (and its agents, unless --leave-agents)")
    p.add_argument("--leave-agents", action="store_true")
    p.add_argument("--no-wait", action="store_true", help="return without waiting for the exit")
    add("demo", "a self-contained run that shows the whole escalation")
    add("mcp", "serve the supervisor to an orchestrating agent: MCP over stdio")
    p = add("top", "live view of system memory and every agent (q quits)")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S", help="refresh, seconds")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p = add("completion", "print the shell completion script; --help says how to install it")
    p.add_argument("shell", choices=completion.SHELLS, metavar="SHELL", help="bash, zsh or fish")
    p.description = "print the script that makes SHELL complete claude-pm's commands and ids"
    p.epilog = completion.INSTALL
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _complete(action: argparse.Action, completer: Callable[..., completion.Candidates]) -> None:
    """``completer`` offers the candidates of ``action`` (argcomplete reads this attribute)."""
    action.completer = completer  # type: ignore[attr-defined]


# -- argument types ----------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def _max_mb(text: str) -> float | str:
    return "auto" if text == "auto" else _positive(text)


def _non_negative(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _positive(text)


def _factor(text: str) -> float:
    value = _positive(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a factor >= 1 (1: no backoff)")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return value


def _words(text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not shell-quoted right: {exc}") from None
    if not words:
        raise argparse.ArgumentTypeError("give the command and its arguments")
    return words


def _ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",")]
    if not all(ids):
        raise argparse.ArgumentTypeError(f"{text!r}: give subprocess ids separated by commas")
    return ids


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not K=V")
    return key, value
