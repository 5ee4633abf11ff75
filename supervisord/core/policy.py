"""The escalation policy: a pure state machine with explicit time.

``step`` sees one sample (or none: a time tick) and returns the next state and the actions to
carry out. It reads no clock and does no I/O, so every rule is tested with explicit timestamps.

Rules (CONTRACT.md, "Agents"):
- levels rise at ``warning_mb`` and ``critical_mb`` and fall only below 90% of their threshold;
- an alert is written when a level is entered and again at most once a minute while it holds;
- at ``max_mb`` the tree gets SIGTERM, and SIGKILL whatever remains ``term_grace_s`` later;
- ``timeout_s`` after launch escalates the same way with reason ``timeout``;
- with monitoring disabled, samples are kept but no memory alert or signal is produced.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, replace

from supervisord.core.kinds import AlertKind, EndReason, Level
from supervisord.core.limits import Limits

REALERT_INTERVAL_S = 60.0
HYSTERESIS = 0.9


@dataclass(frozen=True, slots=True)
class Alert:
    """An action: write this record to the alerts log and tell subscribers."""

    kind: AlertKind
    current_mb: float
    threshold_mb: float
    message: str

    @property
    def level(self) -> Level:
        return self.kind.level


@dataclass(frozen=True, slots=True)
class Signal:
    """An action: send ``signal`` to every live process of the agent's tree."""

    signal: signal.Signals
    reason: EndReason


Action = Alert | Signal


@dataclass(frozen=True, slots=True)
class AgentState:
    """What the policy remembers about one agent between steps."""

    started_at: float
    level: Level = Level.OK
    last_alert_at: float | None = None
    current_mb: float = 0.0
    peak_mb: float = 0.0
    warnings: tuple[str, ...] = ()
    ending: EndReason | None = None
    term_sent_at: float | None = None
    grace_s: float = 0.0
    kill_sent: bool = False
    exited: bool = False
    predicted_at: float | None = None


# A SIGKILLed tree gives its memory back in milliseconds; one still there after this is stuck
# (uninterruptible I/O), and no reason to hold off ending another.
STUCK_AFTER_KILL_S = 2.0


def going(state: AgentState, now: float, stuck_after_s: float = STUCK_AFTER_KILL_S) -> bool:
    """Whether an agent being ended is on its way out: not SIGKILLed yet, or SIGKILLed less
    than ``stuck_after_s`` ago. The SIGKILL went out when the grace ran out at the latest
    (sooner for a kill during the grace), so this never waits longer than that."""
    if state.ending is None:
        return False
    if not state.kill_sent or state.term_sent_at is None:
        return True
    return now - (state.term_sent_at + state.grace_s) < stuck_after_s


def threshold(limits: Limits, level: Level) -> float:
    return {Level.WARNING: limits.warning_mb, Level.CRITICAL: limits.critical_mb}.get(level, 0.0)


def level_for(current: Level, mb: float, limits: Limits) -> Level:
    """The level for ``mb``: rise at a threshold, fall only below 90% of it."""
    raw = Level.OK
    if mb >= limits.critical_mb:
        raw = Level.CRITICAL
    elif mb >= limits.warning_mb:
        raw = Level.WARNING
    held = current
    while held > Level.OK and mb < HYSTERESIS * threshold(limits, held):
        held = Level(held - 1)
    return max(raw, held)


def step(
    state: AgentState,
    now: float,
    limits: Limits,
    mb: float | None = None,
    time_to_limit_s: float | None = None,
) -> tuple[AgentState, list[Action]]:
    """Advance one agent: a sample of ``mb`` taken at ``now``, or a pure time tick (None).

    ``time_to_limit_s`` is the projected time to ``max_mb`` at the current growth rate.
    """
    actions: list[Action] = []
    if mb is not None:
        state = replace(state, current_mb=mb, peak_mb=max(state.peak_mb, mb))
        if limits.enabled:
            state = _levels(state, now, mb, limits, actions)
            state = _predict(state, now, mb, limits, time_to_limit_s, actions)
        else:
            state = replace(state, level=level_for(state.level, mb, limits))
        if limits.enabled and state.ending is None and mb >= limits.max_mb:
            grace = limits.term_grace_s
            sig, event = ("SIGTERM", AlertKind.SIGTERM_SENT)
            if grace <= 0:
                sig, event = ("SIGKILL", AlertKind.SIGKILL_SENT)
            message = f"{sig}: memory {mb:.1f} MB exceeds hard limit {limits.max_mb:g} MB"
            actions.append(_alert(event, mb, limits.max_mb, message))
            state = _begin_end(state, now, EndReason.MEMORY_LIMIT, grace, actions)
    if (
        state.ending is None
        and limits.timeout_s is not None
        and now - state.started_at >= limits.timeout_s
    ):
        ran = now - state.started_at
        message = f"TIMEOUT: running {ran:.1f} s exceeds timeout_s {limits.timeout_s:g} s"
        actions.append(_alert(AlertKind.TIMEOUT, state.current_mb, limits.max_mb, message))
        state = _begin_end(state, now, EndReason.TIMEOUT, limits.term_grace_s, actions)
    return _grace(state, now, actions, limits.max_mb)


def request_end(
    state: AgentState, now: float, reason: EndReason, grace_s: float
) -> tuple[AgentState, list[Action]]:
    """A client's stop (``grace_s`` > 0), kill (0) or the daemon's shutdown."""
    actions: list[Action] = []
    if state.ending is None:
        state = _begin_end(state, now, reason, grace_s, actions)
    elif not state.kill_sent and grace_s < state.grace_s:
        # A harsher request (kill during a stop) shortens the grace already running.
        state = replace(state, grace_s=grace_s)
    return _grace(state, now, actions)


def resume_end(
    state: AgentState,
    now: float,
    reason: EndReason,
    grace_s: float,
    *,
    term_sent_s_ago: float | None,
    kill_sent: bool = False,
) -> tuple[AgentState, list[Action]]:
    """Carry on an escalation a previous daemon began (it crashed, or left its agents).

    The grace runs from the SIGTERM that daemon sent (``term_sent_s_ago``), not from now: an
    agent adopted after its grace ran out gets SIGKILL at once, one adopted within it when
    the rest has passed. When the SIGTERM time is unknown the escalation starts over.
    """
    if term_sent_s_ago is None:
        return request_end(state, now, reason, grace_s)
    state = replace(
        state, ending=reason, term_sent_at=now - term_sent_s_ago, grace_s=grace_s, kill_sent=False
    )
    if kill_sent or grace_s <= 0:
        # SIGKILL again: the one sent before reached only the members that daemon knew.
        return replace(state, kill_sent=True), [Signal(signal.SIGKILL, reason)]
    return _grace(state, now, [])


def root_exited(state: AgentState, now: float, grace_s: float) -> tuple[AgentState, list[Action]]:
    """The agent's own process ended: whatever it left behind gets the usual escalation."""
    state = replace(state, exited=True)
    if state.ending is not None:
        return state, []
    actions: list[Action] = []
    state = _begin_end(state, now, EndReason.EXITED, grace_s, actions)
    return _grace(state, now, actions)


def kernel_oom(
    state: AgentState, now: float, mb: float, ceiling_mb: float
) -> tuple[AgentState, list[Action]]:
    """The tree hit its cgroup's hard ceiling: SIGKILL it now, there is no grace to give.

    (On cgroup v1 the group's tasks are paused at the ceiling, so a SIGTERM handler could
    not even run.) An agent already being ended keeps its reason; otherwise it is
    ``oom_killed``.
    """
    message = f"OOM: tree reached its kernel ceiling {ceiling_mb:g} MB; SIGKILL"
    actions: list[Action] = [_alert(AlertKind.OOM_KILL, mb, ceiling_mb, message)]
    if state.kill_sent:
        return state, actions
    reason = state.ending or EndReason.OOM_KILLED
    actions.append(Signal(signal.SIGKILL, reason))
    term_sent_at = now if state.term_sent_at is None else state.term_sent_at
    return replace(state, ending=reason, term_sent_at=term_sent_at, kill_sent=True), actions


def next_deadline(state: AgentState, limits: Limits) -> float | None:
    """When time alone will next change this agent (grace expiry or timeout), if ever."""
    if state.ending is not None:
        if state.kill_sent or state.term_sent_at is None:
            return None
        return state.term_sent_at + state.grace_s
    if limits.timeout_s is not None:
        return state.started_at + limits.timeout_s
    return None


def _levels(
    state: AgentState, now: float, mb: float, limits: Limits, actions: list[Action]
) -> AgentState:
    new = level_for(state.level, mb, limits)
    if state.ending is not None:
        return replace(state, level=new)
    if new > state.level:
        event = AlertKind.MEMORY_CRITICAL if new is Level.CRITICAL else AlertKind.MEMORY_WARNING
        message = f"{new.name}: memory {mb:.1f} MB exceeds {threshold(limits, new):g} MB"
        actions.append(_alert(event, mb, threshold(limits, new), message))
        return replace(state, level=new, last_alert_at=now, warnings=(*state.warnings, message))
    if new is Level.OK and state.level > Level.OK:
        bound = HYSTERESIS * threshold(limits, Level.WARNING)
        message = f"RECOVERED: memory {mb:.1f} MB back below {bound:.1f} MB"
        actions.append(_alert(AlertKind.RECOVERED, mb, bound, message))
        return replace(state, level=new, last_alert_at=None)
    if new > Level.OK and (
        state.last_alert_at is None or now - state.last_alert_at >= REALERT_INTERVAL_S
    ):
        event = AlertKind.MEMORY_CRITICAL if new is Level.CRITICAL else AlertKind.MEMORY_WARNING
        bound = threshold(limits, new)
        if mb >= bound:
            message = f"{new.name}: memory {mb:.1f} MB exceeds {bound:g} MB (held)"
        else:  # Held by hysteresis: under the threshold, above 90% of it.
            floor = HYSTERESIS * bound
            message = f"{new.name}: memory {mb:.1f} MB still above {floor:.1f} MB (held)"
        actions.append(_alert(event, mb, threshold(limits, new), message))
        return replace(state, level=new, last_alert_at=now)
    return replace(state, level=new)


def _predict(
    state: AgentState,
    now: float,
    mb: float,
    limits: Limits,
    eta_s: float | None,
    actions: list[Action],
) -> AgentState:
    """A warning ahead of the hard limit, at most once a minute while the projection holds."""
    if (
        limits.predict_s is None
        or eta_s is None
        or eta_s > limits.predict_s
        or mb >= limits.max_mb
        or state.ending is not None
        or (state.predicted_at is not None and now - state.predicted_at < REALERT_INTERVAL_S)
    ):
        return state
    message = (
        f"PREDICTED: memory {mb:.1f} MB; at this rate the hard limit "
        f"{limits.max_mb:g} MB is reached in {eta_s:.1f} s"
    )
    actions.append(_alert(AlertKind.LIMIT_PREDICTED, mb, limits.max_mb, message))
    return replace(state, predicted_at=now)


def _begin_end(
    state: AgentState, now: float, reason: EndReason, grace_s: float, actions: list[Action]
) -> AgentState:
    """SIGTERM with a grace period, or straight SIGKILL when there is none (``kill``)."""
    if grace_s <= 0:
        actions.append(Signal(signal.SIGKILL, reason))
        return replace(state, ending=reason, term_sent_at=now, grace_s=0.0, kill_sent=True)
    actions.append(Signal(signal.SIGTERM, reason))
    return replace(state, ending=reason, term_sent_at=now, grace_s=grace_s)


def _grace(
    state: AgentState, now: float, actions: list[Action], max_mb: float = 0.0
) -> tuple[AgentState, list[Action]]:
    if (
        state.ending is not None
        and not state.kill_sent
        and state.term_sent_at is not None
        and now - state.term_sent_at >= state.grace_s
    ):
        if state.ending.aborted:
            message = f"SIGKILL: tree still alive {now - state.term_sent_at:.1f} s after SIGTERM"
            actions.append(_alert(AlertKind.SIGKILL_SENT, state.current_mb, max_mb, message))
        actions.append(Signal(signal.SIGKILL, state.ending))
        state = replace(state, kill_sent=True)
    return state, actions


def _alert(kind: AlertKind, mb: float, threshold_mb: float, message: str) -> Alert:
    return Alert(kind=kind, current_mb=mb, threshold_mb=threshold_mb, message=message)
