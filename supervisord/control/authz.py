"""Who may do what on a shared daemon: pure decisions, with the messages that explain them.

Two roles. Root and the daemon's own user administer: every command, every agent, any
limits. Anyone else the socket lets in (``[daemon] allowed_groups``) is a user: they may
launch and watch agents and end their own, and may only tighten the limits in force, since
those limits protect everyone else's agents on the same machine. Commands not listed for
users are refused by default, so a new command is admin-only until someone decides otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from supervisord.core.limits import Limits
from supervisord.core.restart import RestartPolicy
from supervisord.core.scheduling import Scheduling

USER_COMMANDS = frozenset(
    {
        "hello",
        "ping",
        "status",
        "stats",
        "subscribe",
        "launch",
        "stop",
        "kill",
        "restart",
        "watch",
        "unwatch",
        "run",
        "queue",
        "cancel",
    }
)
THRESHOLDS = ("warning_mb", "critical_mb", "max_mb")


@dataclass(frozen=True, slots=True)
class Denial:
    """What a peer was refused (commands, limit keys, agent ids) and why, for the reply."""

    refused: tuple[str, ...]
    message: str


def is_admin(uid: int, daemon_uid: int | None = None) -> bool:
    """Root and the daemon's own user: they could stop or reconfigure it anyway."""
    return uid in (0, os.geteuid() if daemon_uid is None else daemon_uid)


def owner_filter(uid: int, daemon_uid: int | None = None) -> int | None:
    """Whose agents a peer may see: None for everyone's, else only their own uid's."""
    return None if is_admin(uid, daemon_uid) else uid


def admins(daemon_uid: int | None = None) -> str:
    own = os.geteuid() if daemon_uid is None else daemon_uid
    return "root" if own == 0 else f"root and the daemon's user (uid {own})"


def command_denial(uid: int, cmd: str, daemon_uid: int | None = None) -> Denial | None:
    if cmd in USER_COMMANDS or is_admin(uid, daemon_uid):
        return None
    return Denial(
        (cmd,),
        f"uid {uid} may not {cmd} this daemon; only {admins(daemon_uid)} may "
        f"(other users may: {', '.join(sorted(USER_COMMANDS))})",
    )


def owner_denial(
    uid: int, subprocess_id: str, owner_uid: int | None, verb: str, daemon_uid: int | None = None
) -> Denial | None:
    """``verb`` (end, see) another user's agent: only admins may."""
    if is_admin(uid, daemon_uid) or owner_uid == uid:
        return None
    return Denial(
        (subprocess_id,),
        f"uid {uid} may not {verb} {subprocess_id}: it was launched by uid {owner_uid}; "
        f"only its owner and {admins(daemon_uid)} may",
    )


def weakened(in_force: Limits, requested: Limits) -> list[tuple[str, str]]:
    """Each limit ``requested`` loosens compared with ``in_force``: (key, what it would do).

    The merged limits are compared, not the raw overrides, so a threshold that follows a
    lower ``max_mb`` counts as the tightening it is. ``predict_s`` only adds a warning and
    may be set freely.
    """
    found: list[tuple[str, str]] = []
    if in_force.enabled and not requested.enabled:
        found.append(("enabled", "turn monitoring off (enabled = false)"))
    for key in THRESHOLDS:
        asked, limit = getattr(requested, key), getattr(in_force, key)
        if asked > limit:
            found.append((key, f"raise {key} above {limit:g} MB in force (asked {asked:g} MB)"))
    if in_force.timeout_s is not None:
        if requested.timeout_s is None:
            found.append(("timeout_s", f"remove timeout_s ({in_force.timeout_s:g} s in force)"))
        elif requested.timeout_s > in_force.timeout_s:
            found.append(
                (
                    "timeout_s",
                    f"raise timeout_s above {in_force.timeout_s:g} s in force "
                    f"(asked {requested.timeout_s:g} s)",
                )
            )
    if requested.term_grace_s > in_force.term_grace_s:
        found.append(
            (
                "term_grace_s",
                f"lengthen term_grace_s beyond {in_force.term_grace_s:g} s in force "
                f"(asked {requested.term_grace_s:g} s)",
            )
        )
    if requested.metric != in_force.metric:
        found.append(
            ("metric", f"change metric from {in_force.metric!r} in force to {requested.metric!r}")
        )
    return found


def pushed_ahead(
    in_force: Scheduling, requested: Scheduling, derived_request_mb: float
) -> list[tuple[str, str]]:
    """What a launch would take from everyone else's agents: a higher priority (admitted
    first, shed last) or a smaller request than its type is taken to need (admitted into
    room the others are counting on)."""
    found: list[tuple[str, str]] = []
    if requested.priority > in_force.priority:
        found.append(
            (
                "priority",
                f"raise priority above {in_force.priority} in force (asked {requested.priority})",
            )
        )
    if requested.request_mb is not None and requested.request_mb < derived_request_mb:
        found.append(
            (
                "request_mb",
                f"lower request_mb below {derived_request_mb:g} MB in force "
                f"(asked {requested.request_mb:g} MB)",
            )
        )
    return found


def launch_denial(
    uid: int,
    agent_type: str,
    in_force: Limits,
    requested: Limits,
    *,
    force: bool,
    scheduling: tuple[Scheduling, Scheduling, float] | None = None,
    restarts: tuple[RestartPolicy, RestartPolicy] | None = None,
    daemon_uid: int | None = None,
) -> Denial | None:
    """Why a launch may not go ahead as asked: looser limits than in force, a place in the
    budget taken from others (``scheduling``: in force, asked, derived request), more runs
    in less time than the restart policy in force allows (``restarts``: in force, asked),
    or ``force``."""
    if is_admin(uid, daemon_uid):
        return None
    found = weakened(in_force, requested)
    if scheduling is not None:
        found += pushed_ahead(*scheduling)
    if restarts is not None:
        found += faster_restarts(*restarts)
    if force:
        found.append(("force", "force a launch past the host's memory budget"))
    if not found:
        return None
    clauses = "; nor ".join(what for _, what in found)
    return Denial(
        tuple(key for key, _ in found),
        f"uid {uid} may not {clauses} for {agent_type}; only {admins(daemon_uid)} may "
        "(other users may only tighten limits)",
    )


def faster_restarts(in_force: RestartPolicy, asked: RestartPolicy) -> list[tuple[str, str]]:
    """The restart rate limit is what keeps a crash loop from churning the host: a user may
    choose when their agent comes back, not let it come back more often."""
    found = []
    if asked.restart_limit > in_force.restart_limit:
        found.append(
            ("restart_limit", f"raise restart_limit above {in_force.restart_limit} in force")
        )
    if asked.restart_window_s < in_force.restart_window_s:
        found.append(
            (
                "restart_window_s",
                f"shorten restart_window_s below {in_force.restart_window_s:g} s in force",
            )
        )
    return found


def process_denial(
    uid: int, pid: int, process_uid: int, daemon_uid: int | None = None
) -> Denial | None:
    """``watch`` of a process: only its owner (and admins) may put it under supervision,
    which can end it."""
    if is_admin(uid, daemon_uid) or process_uid == uid:
        return None
    return Denial(
        (str(pid),),
        f"uid {uid} may not watch pid {pid}: it runs as uid {process_uid}; only its owner and "
        f"{admins(daemon_uid)} may",
    )


def grace_denial(
    uid: int, subprocess_id: str, grace_s: float, term_grace_s: float, daemon_uid: int | None = None
) -> Denial | None:
    """A stop's grace over the agent's term_grace_s: while it runs, max_mb and timeout_s are
    no longer enforced (the agent is already being ended), so it would loosen them too."""
    if is_admin(uid, daemon_uid) or grace_s <= term_grace_s:
        return None
    return Denial(
        ("grace_s",),
        f"uid {uid} may not stop {subprocess_id} with grace_s {grace_s:g} s, beyond its "
        f"term_grace_s {term_grace_s:g} s in force; only {admins(daemon_uid)} may",
    )
