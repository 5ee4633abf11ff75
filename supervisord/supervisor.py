"""The supervisor owns the agents: it samples, feeds the policy and carries out its actions.

Nothing else mutates agent state. One sampling loop serves every agent: it scans /proc in a
worker thread, steps each agent's policy and sleeps until the next interval or the next
deadline (a grace period or timeout running out), or until something wakes it early.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup, TaskStatus

from supervisord import cadence, enforcer, launcher, launchplan, policy, procfs, state
from supervisord.agent import Agent, lost_record
from supervisord.backstop import Backstop
from supervisord.bus import Broadcaster
from supervisord.cgroup import AgentCgroup, CgroupError
from supervisord.config import Config, Limits
from supervisord.errors import LaunchError, LaunchRefused, NotFoundError, SupervisordError
from supervisord.eventlog import EventLog, timestamps
from supervisord.events import Action, Alert, AlertEvent, EndReason, Level, Signal
from supervisord.home import Home
from supervisord.launchplan import LaunchRequest
from supervisord.sampler import Root, Sampler, TreeSample
from supervisord.state import AgentRecord
from supervisord.sysmem import MIB, system_memory

log = structlog.get_logger("supervisord.supervisor")
PERSIST_INTERVAL_S = 1.0
SIGNAL_RECHECK_S = 0.1
DISCOVERY_INTERVAL_S = 30.0
APPLY_BATCH = 50


class Supervisor:
    def __init__(
        self,
        config: Config,
        home: Home,
        eventlog: EventLog,
        *,
        clock: Callable[[], float] = time.monotonic,
        reap_orphans: bool = False,
        on_tick: Callable[[int], None] | None = None,
        backstop: Backstop | None = None,
    ) -> None:
        self.config = config
        self.backstop = backstop
        self.cgroup_status: dict[str, Any] = {"in_force": "off", "reason": "not detected"}
        self.home = home
        self.eventlog = eventlog
        self.bus = Broadcaster()
        self.clock = clock
        self.reap_orphans = reap_orphans
        self.on_tick = on_tick
        self.agents: dict[str, Agent] = {}
        self._sampler = Sampler()
        self._limiter = anyio.CapacityLimiter(1)
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self._persist_wake = anyio.Event()
        self._persist_due = float("inf")
        self._persist_now = anyio.Event()
        self._persist_done = anyio.Event()
        self._persist_requested = 0
        self._persist_written = 0
        self._persisted_count = -1
        self._full_due = 0.0
        self._epoch = clock()
        self.last_sample_s = 0.0
        self.fast_samples = 0
        self.full_scans = 0
        self.loop_turns = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._sample_loop)
            tg.start_soon(self._persister)
            if self.reap_orphans:
                tg.start_soon(self._reaper)
            task_status.started()

    # -- commands ---------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> Agent:
        assert self._tg is not None, "Supervisor.run() must be started first"
        limits = self.config.limits_for(request.agent_type, request.limits)
        command = launchplan.resolve_command(self.config, request, self.home.config_file)
        subprocess_id = launcher.new_subprocess_id(request.agent_type)
        refused = launchplan.refusal(request, limits, system_memory().available_mb)
        if refused is not None:
            alert = Alert(AlertEvent.LAUNCH_REFUSED, Level.WARNING, 0.0, limits.warning_mb, refused)
            self._write_alert(subprocess_id, request.agent_type, None, alert, EndReason.STOPPED)
            raise LaunchRefused(refused)
        cgroup = None if self.backstop is None else self.backstop.create(subprocess_id, limits)
        log_path = self.home.agent_log(subprocess_id)
        spec = launchplan.spec_for(self.config, request, subprocess_id, command, log_path, cgroup)
        try:
            child = launcher.spawn(spec)
        except LaunchError:
            if cgroup is not None:
                cgroup.remove()
            raise
        now = self.clock()
        agent = Agent(
            id=subprocess_id,
            agent_type=request.agent_type,
            command=command,
            child=child,
            limits=limits,
            overrides=dict(request.limits),
            started_wall=datetime.now(UTC),
            state=policy.AgentState(started_at=now),
            owner_uid=request.owner_uid,
            members=((child.pid, child.start),),
            cgroup=cgroup,
        )
        self._register(agent)
        await self.persisted()
        log.info(
            "agent_launched", subprocess_id=subprocess_id, pid=child.pid, command=list(command)
        )
        self.bus.publish({"type": "launch", **agent.stats(now), **timestamps()})
        return agent

    def adopt(self, records: list[AgentRecord]) -> None:
        """Carry on supervising agents a previous daemon left running (after a crash or a
        ``shutdown --leave-agents``); record those that ended meanwhile as ``lost``."""
        for record in records:
            child = launcher.adopt(record.pid, record.start)
            if child is None:
                if self.backstop is not None and (
                    gone := self.backstop.adopt(record.subprocess_id)
                ):
                    self._retire_later(gone)
                lost = lost_record(record)
                self.eventlog.stats.write(lost)
                self.bus.publish({"type": "exit", **lost})
                log.warning("agent_lost", subprocess_id=record.subprocess_id, pid=record.pid)
                continue
            try:
                limits = self.config.limits_for(record.agent_type, record.overrides)
            except SupervisordError:
                limits = Limits(**record.limits)  # Its type's section changed; keep its own.
            agent = Agent.restore(record, child, limits, self.clock())
            if self.backstop is not None:
                agent.cgroup = self.backstop.adopt(agent.id)
            self._sampler.remember(agent.id, agent.members)
            self._register(agent)
            log.info("agent_adopted", subprocess_id=agent.id, pid=child.pid)

    def _retire_later(self, cgroup: AgentCgroup) -> None:
        """Remove an agent's cgroup once the kernel lets go of it (off the event loop)."""
        if self.backstop is not None and self._tg is not None:
            self._tg.start_soon(self.backstop.retire, cgroup)

    def _register(self, agent: Agent) -> None:
        assert self._tg is not None, "Supervisor.run() must be started first"
        self.agents[agent.id] = agent
        self._tg.start_soon(self._watch_exit, agent)
        if self.backstop is not None and agent.cgroup is not None:
            self._tg.start_soon(self._watch_cgroup, agent, self.backstop, agent.cgroup)
        self.persist(force=True)
        self._wake.set()

    def persist(self, *, force: bool = False) -> None:
        """Ask for run/state.json to be brought up to date: at once (``force``: an agent
        came or went) or within a second; written from a worker thread by ``_persister``."""
        due = self.clock() + (0.0 if force else PERSIST_INTERVAL_S)
        self._persist_due = min(self._persist_due, due)
        self._persist_wake.set()
        if force:
            self._persist_requested += 1
            self._persist_now.set()

    async def persisted(self) -> None:
        """Until run/state.json holds everything up to now: a launch is answered only once a
        crash right after it could not lose the agent. Concurrent callers share one write."""
        self.persist(force=True)
        wanted = self._persist_requested
        while self._persist_written < wanted:
            await self._persist_done.wait()

    async def _persister(self) -> None:
        while True:
            await self._persist_wake.wait()
            with anyio.move_on_after(max(0.0, self._persist_due - self.clock())):
                await self._persist_now.wait()  # a forced request cuts the wait short
            force = self._persist_now.is_set()
            self._persist_wake, self._persist_now = anyio.Event(), anyio.Event()
            self._persist_due = float("inf")
            covered = self._persist_requested
            await self.write_state(force=force)
            self._persist_written = covered
            self._persist_done.set()
            self._persist_done = anyio.Event()

    async def write_state(self, *, force: bool = True) -> None:
        entries = [agent.state_entry() for agent in self.agents.values()]
        changed = any(c for c, _ in entries) or len(entries) != self._persisted_count
        if not (force or changed):
            return
        self._persisted_count = len(entries)
        agents = [entry for _, entry in entries]
        try:
            await anyio.to_thread.run_sync(state.save, self.home.state_file, os.getpid(), agents)
        except OSError as exc:
            log.error("state_save_failed", path=str(self.home.state_file), error=str(exc))

    def get(self, subprocess_id: str) -> Agent:
        try:
            return self.agents[subprocess_id]
        except KeyError:
            raise NotFoundError(f"no agent {subprocess_id}") from None

    def sampling(self) -> dict[str, Any]:
        """How the sampler is doing, for ``status``."""
        return {
            "full_scans": self.full_scans,
            "fast_samples": self.fast_samples,
            "loop_turns": self.loop_turns,
            "last_scan_ms": round(self.last_sample_s * 1000, 2),
            "open_statm_fds": self._sampler.open_fds,
            "discovery_interval_s": self._discovery_interval(),
        }

    def stats(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [agent.stats(now) for agent in self.agents.values()]

    async def stop(
        self,
        subprocess_id: str,
        grace_s: float | None = None,
        reason: EndReason = EndReason.STOPPED,
    ) -> dict[str, Any]:
        """End one agent with the usual escalation and return its final stats record."""
        agent = self.get(subprocess_id)
        grace = agent.limits.term_grace_s if grace_s is None else grace_s
        agent.state, actions = policy.request_end(agent.state, self.clock(), reason, grace)
        self._carry_out(agent, actions)
        self._wake.set()
        await agent.done.wait()
        assert agent.record is not None
        return agent.record

    async def stop_all(self, reason: EndReason = EndReason.DAEMON_SHUTDOWN) -> None:
        async with anyio.create_task_group() as tg:
            for subprocess_id in list(self.agents):
                tg.start_soon(self._stop_quietly, subprocess_id, reason)

    def apply_config(self, config: Config) -> None:
        """New thresholds for running agents (``reload``); their launch overrides still win."""
        for agent in self.agents.values():
            agent.limits = config.limits_for(agent.agent_type, agent.overrides)
            if self.backstop is not None and agent.cgroup is not None:
                self.backstop.apply(agent.cgroup, agent.limits)
        self.config = config
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        while True:
            self._wake = anyio.Event()
            self.loop_turns += 1
            now = self.clock()
            due = [a for a in self.agents.values() if self._due(a) <= now]
            # Agents due just before the next full scan wait for it: no tree is read twice.
            fold = self.config.daemon.min_interval_s
            if now >= self._full_due or (due and self._full_due - now <= fold):
                discovery = self._discovery_interval()
                self._full_due = self._next_tick(now + discovery - self.config.check_interval_s)
                await self.sample_once()
            elif due:
                await self._sample_fast(due)
            self.persist()
            if self.on_tick is not None:
                # The watchdog hears from this loop itself: if it stalls, systemd notices.
                self.on_tick(len(self.agents))
            with anyio.move_on_after(self._next_delay()):
                await self._wake.wait()

    def _discovery_interval(self) -> float:
        """How often all of /proc is scanned. Agents in a memory cgroup need no scan to find
        their members (the group lists them), only to reap orphans; others need one a tick."""
        if self.backstop is not None and all(a.cgroup for a in self.agents.values()):
            return max(DISCOVERY_INTERVAL_S, self.config.check_interval_s)
        return self.config.check_interval_s

    def request_full_scan(self) -> None:
        """Rediscover every tree now (an agent's own process ended: orphans to find)."""
        self._full_due = 0.0
        self._wake.set()

    async def sample_once(self) -> None:
        """One /proc scan for every tree: discovery of new and reparented descendants."""
        roots = {a.id: self._root(a) for a in self.agents.values()}
        started = time.perf_counter()
        result = await anyio.to_thread.run_sync(self._sampler.sample, roots, limiter=self._limiter)
        self.last_sample_s = time.perf_counter() - started
        self.full_scans += 1
        await self._apply_all(result.trees)
        if self.reap_orphans:
            _reap(result.orphan_zombies)

    async def _sample_fast(self, agents: list[Agent]) -> None:
        """Only the trees that need a look before the next full scan, from kept-open fds."""
        roots = {a.id: self._root(a) for a in agents}
        trees = await anyio.to_thread.run_sync(
            self._sampler.sample_fast, roots, limiter=self._limiter
        )
        self.fast_samples += 1
        await self._apply_all(trees)

    async def _apply_all(self, trees: Mapping[str, TreeSample]) -> None:
        now = self.clock()
        for n, (agent_id, tree) in enumerate(trees.items(), 1):
            agent = self.agents.get(agent_id)
            if agent is not None:
                self._apply_sample(agent, tree, now)
            if n % APPLY_BATCH == 0:
                # Hundreds of agents in one tick: let waiting clients in between batches.
                await anyio.lowlevel.checkpoint()

    def _root(self, agent: Agent) -> Root:
        limits = agent.limits
        return Root(
            agent.child.pid,
            agent.child.start,
            limits.metric,
            0.9 * limits.warning_mb,
            agent.cgroup,
        )

    def _apply_sample(self, agent: Agent, tree: TreeSample, now: float) -> None:
        if tree.unchanged and agent.exit is None and _quiet(agent, tree.mb):
            # The kernel says not a byte moved: nothing to decide, only when to look again.
            agent.growth = cadence.observe(agent.growth, now, tree.mb)
            self._reschedule(agent, now)
            return
        agent.members = tree.members
        mb = None
        eta = None
        if tree.members:
            mb = tree.mb
            if mb > 0:  # A process being killed shows 0 for an instant before it is gone.
                agent.end_mb = mb
            if agent.start_mb is None:
                agent.start_mb = mb
            if mb >= agent.limits.max_mb and agent.crossed_at is None:
                agent.crossed_at = cadence.crossing_time(agent.growth, now, mb, agent.limits.max_mb)
            agent.growth = cadence.observe(agent.growth, now, mb)
            eta = cadence.time_to(agent.growth, agent.limits.max_mb)
        if not _quiet(agent, mb):
            agent.state, actions = policy.step(agent.state, now, agent.limits, mb, eta)
            self._carry_out(agent, actions)
        if agent.exit is not None and not tree.members:
            self._finish(agent)
            return
        self._reschedule(agent, now)

    def _reschedule(self, agent: Agent, now: float) -> None:
        floor = self.config.daemon.min_interval_s
        age = now - agent.state.started_at
        interval = self.config.check_interval_s
        delay = cadence.next_delay(agent.growth, agent.limits, age, floor, interval)
        if delay >= interval:
            # Idle: join the common tick, so a fleet launched over minutes is still read in
            # one batch per interval rather than each agent waking the loop on its own.
            agent.next_due = self._next_tick(now)
        else:
            agent.next_due = now + delay

    def _next_tick(self, now: float) -> float:
        interval = self.config.check_interval_s
        return self._epoch + (math.floor((now - self._epoch) / interval) + 1) * interval

    def _due(self, agent: Agent) -> float:
        deadline = policy.next_deadline(agent.state, agent.limits)
        return agent.next_due if deadline is None else min(agent.next_due, deadline)

    def _next_delay(self) -> float:
        wake = self._full_due
        for agent in self.agents.values():
            wake = min(wake, self._due(agent))
        return max(0.0, wake - self.clock())

    async def _reaper(self) -> None:
        """Reap adopted orphans as they die (SIGCHLD), not only at the next /proc scan."""
        with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
            async for _ in signals:
                roots = {a.child.pid for a in self.agents.values()}
                _reap(tuple(_zombie_children(roots)))

    async def _watch_exit(self, agent: Agent) -> None:
        agent.exit = await launcher.wait_exit(agent.child)
        log.info("agent_exited", subprocess_id=agent.id, status=agent.exit.describe())
        # What the agent leaves behind is stopped too: an orphaned helper is still its tree.
        agent.state, actions = policy.root_exited(
            agent.state, self.clock(), agent.limits.term_grace_s
        )
        self._carry_out(agent, actions)
        self.request_full_scan()

    async def _watch_cgroup(self, agent: Agent, backstop: Backstop, cgroup: AgentCgroup) -> None:
        """The kernel's view of the tree: usage at max_mb, the ceiling reached."""

        def at_threshold() -> None:
            agent.next_due = self.clock()  # look now, not at the next tick
            self._wake.set()

        def at_ceiling(mb: float) -> None:
            agent.state, actions = policy.kernel_oom(
                agent.state, self.clock(), mb, backstop.ceiling_mb(agent.limits)
            )
            self._carry_out(agent, actions)

        with anyio.CancelScope() as scope:
            agent.cgroup_scope = scope
            try:
                await backstop.watch(cgroup, agent.limits.max_mb, at_threshold, at_ceiling)
            except* (CgroupError, OSError) as group:
                # The group went away under us (an agent that ended at once, its group
                # already removed): one agent's watcher, never the daemon. Polling carries on.
                errors = [str(exc) for exc in group.exceptions]
                log.warning("cgroup_watch_failed", subprocess_id=agent.id, errors=errors)

    async def _stop_quietly(self, subprocess_id: str, reason: EndReason) -> None:
        with suppress(NotFoundError):  # It may have ended on its own meanwhile.
            await self.stop(subprocess_id, reason=reason)

    # -- actions ----------------------------------------------------------------------------

    def _carry_out(self, agent: Agent, actions: list[Action]) -> None:
        # Signals first: the records can wait a millisecond, a tree at its limit cannot.
        for action in actions:
            if isinstance(action, Signal):
                self._send(agent, action)
        for action in actions:
            if isinstance(action, Alert):
                self._write_alert(
                    agent.id,
                    agent.agent_type,
                    agent.child.pid,
                    action,
                    agent.state.ending,
                    self._alert_fields(agent, action),
                )

    def _alert_fields(self, agent: Agent, alert: Alert) -> dict[str, Any]:
        """Growth and timing figures that make an alert actionable."""
        fields: dict[str, Any] = dict(agent.projection())
        if alert.event in (AlertEvent.SIGTERM_SENT, AlertEvent.SIGKILL_SENT) and (
            agent.crossed_at is not None and agent.signalled_at is not None
        ):
            fields["crossed_to_term_s"] = round(agent.signalled_at - agent.crossed_at, 4)
        return fields

    def _send(self, agent: Agent, action: Signal) -> None:
        if agent.signalled_at is None:
            agent.signalled_at = self.clock()
        sent: list[int] = []
        if agent.child.pidfd >= 0 and enforcer.signal_pidfd(agent.child.pidfd, action.signal):
            sent.append(agent.child.pid)
        others = [m for m in agent.members if m[0] != agent.child.pid]
        sent += enforcer.signal_tree(others, action.signal)
        if agent.cgroup is not None:
            # Members no scan has seen yet (forked a moment ago) are in the group already.
            with suppress(OSError):
                sent += [p for p in agent.cgroup.signal_all(action.signal) if p not in sent]
        # Look again soon: the tree may be gone, or may need SIGKILL for a new child.
        agent.next_due = min(agent.next_due, self.clock() + SIGNAL_RECHECK_S)
        if sent:
            log.info(
                "signal_sent",
                subprocess_id=agent.id,
                signal=action.signal.name,
                reason=action.reason.value,
                pids=sent,
            )

    def _write_alert(
        self,
        subprocess_id: str,
        agent_type: str,
        pid: int | None,
        alert: Alert,
        reason: EndReason | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        record = {
            **timestamps(),
            "level": alert.level.name,
            "event": alert.event.value,
            "subprocess_id": subprocess_id,
            "agent_type": agent_type,
            "pid": pid,
            "current_mb": round(alert.current_mb, 1),
            "threshold_mb": alert.threshold_mb,
            "message": alert.message,
            "system_memory": system_memory().as_dict(),
        }
        if reason is not None:
            record["reason"] = reason.value
        record.update(extra or {})
        self.eventlog.alerts.write(record)
        log.warning(
            "memory_alert",
            subprocess_id=subprocess_id,
            alert_event=alert.event.value,
            message=alert.message,
        )
        self.bus.publish({"type": "alert", **record})

    def _finish(self, agent: Agent) -> None:
        assert agent.exit is not None
        now = self.clock()
        reason = agent.state.ending or EndReason.EXITED
        record = agent.end_record(now)
        if agent.cgroup is not None:
            with suppress(OSError):
                # The kernel's own high-water mark of the tree: every byte, never sampled.
                peak = agent.cgroup.peak_bytes()
                if peak is not None:
                    record["memory_stats"]["cgroup_peak_mb"] = round(peak / MIB, 1)
        self.eventlog.stats.write(record)
        agent.record = record
        del self.agents[agent.id]
        self._sampler.forget(agent.id)
        if agent.cgroup_scope is not None:
            agent.cgroup_scope.cancel()
        if agent.cgroup is not None:
            self._retire_later(agent.cgroup)
        self.persist(force=True)
        if agent.signalled_at is not None:
            record_event = {**record, "term_to_gone_s": round(now - agent.signalled_at, 4)}
        else:
            record_event = record
        log.info(
            "agent_finished",
            subprocess_id=agent.id,
            reason=reason.value,
            peak_mb=round(agent.state.peak_mb, 1),
        )
        self.bus.publish({"type": "exit", **record_event})
        agent.done.set()


def _quiet(agent: Agent, mb: float | None) -> bool:
    """Nothing the policy could do with this sample: an idle agent at the same memory, at
    level OK, with no clock running on it. Skipping the step saves most of the per-agent cost
    of a tick for a fleet of idle agents; the result would be the state it already has."""
    state, limits = agent.state, agent.limits
    return (
        mb is not None
        and mb == state.current_mb
        and state.level is Level.OK
        and state.ending is None
        and limits.timeout_s is None
        and limits.predict_s is None
    )


def _zombie_children(agent_pids: set[int]) -> list[int]:
    """Our own dead children that are not agents (those are reaped through their pidfd)."""
    zombies = []
    for pid in procfs.children_of(os.getpid()):
        if pid not in agent_pids and (entry := procfs.read_entry(pid)) is not None and entry.zombie:
            zombies.append(pid)
    return zombies


def _reap(pids: tuple[int, ...]) -> None:
    """Reap adopted orphans by pid; never waitpid(-1), which would steal agents' statuses."""
    for pid in pids:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
