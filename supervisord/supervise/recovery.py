"""What a starting daemon makes of what a previous one left: agents in state.json, and agent
cgroups that still hold processes although state.json does not name them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from supervisord.config.settings import Config, validate_agent_type
from supervisord.core.errors import ConfigError, SupervisordError
from supervisord.core.events import ExitEvent
from supervisord.core.kinds import EndReason
from supervisord.core.limits import Limits
from supervisord.core.policy import Action
from supervisord.core.records import AgentRecord, lost_event
from supervisord.core.restart import RestartPolicy
from supervisord.host import launcher, procfs
from supervisord.host.agentlog import OutputPlace
from supervisord.host.cgroup.backstop import Backstop
from supervisord.host.cgroup.base import AgentCgroup
from supervisord.supervise.agent import Agent

log = structlog.get_logger("supervisord.supervise.recovery")
UNKNOWN_TYPE = "unknown"


@dataclass(frozen=True, slots=True)
class Resumed:
    """A live agent to supervise again, and what to do about it at once."""

    agent: Agent
    actions: list[Action]


@dataclass(frozen=True, slots=True)
class Lost:
    """An agent that ended while no daemon watched it: its record, and its cgroup to remove."""

    event: ExitEvent
    cgroup: AgentCgroup | None


def resume(
    record: AgentRecord,
    config: Config,
    backstop: Backstop | None,
    place: OutputPlace,
    now: float,
) -> Resumed | Lost:
    """Re-adopt the agent of one state.json entry, if its pid is still that process."""
    child = launcher.adopt(record.pid, record.start, place, record.subprocess_id)
    if child is None:
        gone = None if backstop is None else backstop.adopt(record.subprocess_id)
        return Lost(lost_event(record), gone)
    try:
        limits = config.limits_for(record.agent_type, record.overrides)
    except SupervisordError:
        limits = Limits(**record.limits)  # Its type's section changed; keep its own.
    agent, actions = Agent.restore(record, child, limits, now, _restart_policy(record, config))
    if backstop is not None:
        agent.cgroup = backstop.adopt(agent.id)
    return Resumed(agent, actions)


def _restart_policy(record: AgentRecord, config: Config) -> RestartPolicy:
    """Its policy as the config now says (the launch's own keys over its type's)."""
    overrides = (record.launch or {}).get("restart") or {}
    try:
        return config.restart_for(record.agent_type, overrides)
    except SupervisordError:
        return RestartPolicy()  # Its type's section changed under it: no restarts then.


def leftover_records(backstop: Backstop, config: Config) -> list[AgentRecord]:
    """State entries for the backstop's populated leftover groups (see ``leftover_record``)."""
    records = []
    for subprocess_id in backstop.leftovers:
        cgroup = backstop.adopt(subprocess_id)
        if cgroup is None:
            continue
        record = leftover_record(subprocess_id, cgroup, config)
        cgroup.close()  # resume() opens it again, with the agent
        if record is not None:
            records.append(record)
            log.warning("agent_leftover", subprocess_id=subprocess_id, pid=record.pid)
    return records


def leftover_record(subprocess_id: str, cgroup: AgentCgroup, config: Config) -> AgentRecord | None:
    """A state entry for a populated agent group nobody remembers (state.json lost, or not yet
    written when the daemon died), marked as ending ``lost``: adopting it gives its processes
    the usual escalation and, once they are gone, a stats record. None when it emptied."""
    members = []
    for pid in cgroup.pids():
        entry = procfs.read_entry(pid)
        if entry is not None and not entry.zombie:
            members.append((entry.start, pid))
    if not members:
        return None
    members.sort()
    start, root = members[0]  # the oldest member stands for the agent
    agent_type = subprocess_id.rpartition("_")[0]
    try:
        validate_agent_type(agent_type)
    except ConfigError:
        agent_type = UNKNOWN_TYPE
    limits = config.limits_for(agent_type)
    return AgentRecord(
        subprocess_id=subprocess_id,
        agent_type=agent_type,
        command=procfs.cmdline(root),
        pid=root,
        start=start,
        started_wall=datetime.now(UTC).isoformat(),
        limits=limits.as_dict(),
        overrides={},
        ending=EndReason.LOST.value,
        members=[[pid, s] for s, pid in members],
    )
