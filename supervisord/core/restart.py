"""Restart policies: whether an ended run comes back, after how long, and when to give up.

The model is systemd's and PM2's: a ``restart`` mode says which ends bring a run back; the
delay starts at ``restart_delay_s`` and grows by ``restart_backoff`` per quick failure up to
``restart_delay_max_s``, with jitter so that a fleet failing together does not come back
together; more than ``restart_limit`` runs started within ``restart_window_s`` and the agent
has failed for good (systemd's StartLimitBurst in StartLimitIntervalSec). A run that lived
``restart_reset_s`` or longer was healthy: the backoff starts over.

Pure: every time is given by the caller, so the policy is tested with explicit timestamps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from supervisord.core.errors import ConfigError
from supervisord.core.kinds import EndReason
from supervisord.core.validate import integer, number, positive, string_list

Mode = Literal["no", "on-failure", "on-abort", "always"]
MODES: tuple[Mode, ...] = ("no", "on-failure", "on-abort", "always")
# Ends a person or the daemon's own shutdown asked for: never restarted, whatever the mode.
_REQUESTED = frozenset({EndReason.STOPPED, EndReason.DAEMON_SHUTDOWN})


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    restart: Mode = "no"
    restart_delay_s: float = 1.0
    restart_backoff: float = 2.0
    restart_delay_max_s: float = 60.0
    restart_limit: int = 5
    restart_window_s: float = 300.0
    restart_reset_s: float = 60.0
    # Fraction of the delay added or taken at random (the caller's draw, see ``delay``).
    restart_jitter: float = 0.1
    # The command of every run after the first (None: ``command`` again).
    resume_command: tuple[str, ...] | None = None
    # A regex with one group, matched against the agent's output: its ``{session_id}``.
    session_pattern: str | None = None

    def as_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.resume_command is not None:
            values["resume_command"] = list(self.resume_command)
        return values

    def wants(self, reason: EndReason, exit_code: int | None, signalled: bool) -> bool:
        """Whether a run that ended so comes back. ``signalled``: the daemon sent the signal
        that ended it (a signal it did not send is a failure)."""
        if self.restart == "no" or reason in _REQUESTED:
            return False
        if self.restart == "always":
            return True
        if self.restart == "on-abort":
            return reason.aborted
        failed = exit_code not in (0, None) or (exit_code is None and not signalled)
        return reason in (EndReason.EXITED, EndReason.LOST) and failed

    def delay(self, streak: int, draw: float) -> float:
        """Seconds before the next run, after ``streak`` quick failures in a row (0: the
        first); ``draw`` in [0, 1) places the jitter (0.5: none)."""
        base = min(self.restart_delay_s * self.restart_backoff**streak, self.restart_delay_max_s)
        return max(0.0, base * (1 + self.restart_jitter * (2 * draw - 1)))


RESTART_KEYS = frozenset(f.name for f in fields(RestartPolicy))


@dataclass(frozen=True, slots=True)
class Runs:
    """One agent's runs so far: what the policy needs to decide the next."""

    run: int = 1  # the number of the run now (or last) running, from 1
    streak: int = 0  # quick failures in a row, for the backoff
    starts: tuple[float, ...] = ()  # when runs started, those within the window

    @property
    def restarts(self) -> int:
        return self.run - 1


@dataclass(frozen=True, slots=True)
class Next:
    """What follows an ended run: the next after ``delay_s``, or nothing (``failed``)."""

    runs: Runs
    delay_s: float | None
    failed: str | None = None


def after_run(
    policy: RestartPolicy, runs: Runs, started_at: float, ended_at: float, draw: float
) -> Next:
    """The decision once a run the policy wants back has ended (see ``RestartPolicy.wants``).

    The next run is due at ``ended_at + delay_s``; ``starts`` keeps the run starts within
    ``restart_window_s`` of that moment, the next one included.
    """
    streak = 0 if ended_at - started_at >= policy.restart_reset_s else runs.streak
    delay = policy.delay(streak, draw)
    due = ended_at + delay
    starts = tuple(t for t in (*runs.starts, started_at) if due - t < policy.restart_window_s)
    if len(starts) + 1 > policy.restart_limit:
        reason = (
            f"{len(starts)} runs started within {policy.restart_window_s:g} s "
            f"(restart_limit = {policy.restart_limit}): not restarted again"
        )
        return Next(replace(runs, starts=starts), None, failed=reason)
    return Next(Runs(run=runs.run + 1, streak=streak + 1, starts=starts), delay)


def apply_restart(base: RestartPolicy, values: Mapping[str, Any], where: str) -> RestartPolicy:
    """``base`` with the restart keys of ``values``; others are ignored. A bad value raises a
    ConfigError naming ``where.key``, the value and what is allowed."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key == "restart":
            if value not in MODES:
                allowed = ", ".join(repr(m) for m in MODES)
                raise ConfigError(f"{name} = {value!r} is not allowed; use one of {allowed}")
            changes[key] = value
        elif key in ("restart_delay_s", "restart_delay_max_s", "restart_reset_s"):
            changes[key] = positive(name, number(name, value), allow_zero=True)
        elif key == "restart_window_s":
            changes[key] = positive(name, number(name, value))
        elif key == "restart_backoff":
            factor = positive(name, number(name, value))
            if factor < 1:
                raise ConfigError(
                    f"{name} = {factor:g} is not allowed; give a factor >= 1 (1: no backoff)"
                )
            changes[key] = factor
        elif key == "restart_jitter":
            fraction = positive(name, number(name, value), allow_zero=True)
            if fraction >= 1:
                raise ConfigError(f"{name} = {fraction:g} is not allowed; give a fraction < 1")
            changes[key] = fraction
        elif key == "restart_limit":
            changes[key] = integer(name, value, 1)
        elif key == "resume_command":
            command = string_list(name, value)
            if not command:
                raise ConfigError(f"{name} = [] is not allowed; give the command and its args")
            changes[key] = tuple(command)
        elif key == "session_pattern":
            changes[key] = session_pattern(name, value)
    policy = replace(base, **changes)
    if policy.restart_delay_max_s < policy.restart_delay_s:
        raise ConfigError(
            f"{where}.restart_delay_max_s = {policy.restart_delay_max_s:g} is below "
            f"restart_delay_s = {policy.restart_delay_s:g}; give a maximum >= the first delay"
        )
    return policy


def session_pattern(name: str, value: Any) -> str:
    """A regex that compiles and has exactly one group (the session id)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} = {value!r} is not allowed; give a regular expression")
    try:
        compiled = re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{name} = {value!r} does not compile: {exc}") from None
    if compiled.groups != 1:
        raise ConfigError(
            f"{name} = {value!r} has {compiled.groups} groups; give exactly one, around the "
            "session id (for example 'session: (\\S+)')"
        )
    return value
