"""The supervisor's engine: one sampling loop for every agent, and what it sets off.

Nothing else mutates agent state. The loop scans /proc in a worker thread, steps each agent's
policy and sleeps until the next interval or the next deadline (a grace period or timeout
running out), or until something wakes it early. Persistence (``StateWriter``), signals
(``enforcer``), records (``core.events``) and reaping (``reaper``) live at the edges; this
module decides when each is called. ``supervisor`` builds the commands on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup, TaskStatus

from supervisord.config.home import Home
from supervisord.config.settings import Config
from supervisord.core import policy, tracker
from supervisord.core.events import AlertEvent, Event, ExitEvent
from supervisord.core.kinds import AlertKind
from supervisord.core.policy import Action, Alert, Signal
from supervisord.core.units import MIB
from supervisord.host import enforcer, launcher, reaper
from supervisord.host.cgroup import escape
from supervisord.host.cgroup.backstop import Backstop
from supervisord.host.cgroup.base import AgentCgroup
from supervisord.host.sampler import Root, Sampler, TreeSample
from supervisord.host.statefile import StateWriter
from supervisord.host.sysmem import system_memory
from supervisord.supervise.agent import Agent
from supervisord.supervise.bus import Broadcaster
from supervisord.supervise.kernel import KernelWatch
from supervisord.supervise.schedule import Schedule

log = structlog.get_logger("supervisord.supervise.engine")
# The alerts that say the daemon is ending an agent, and why.
ENDING_ALERTS = frozenset(
    {AlertKind.SIGTERM_SENT, AlertKind.SIGKILL_SENT, AlertKind.TIMEOUT, AlertKind.OOM_KILL}
)
SIGNAL_RECHECK_S = 0.1
DISCOVERY_INTERVAL_S = 30.0
APPLY_BATCH = 50


class RecordSink(Protocol):
    """Where alert and stats records are written (the event log)."""

    def alert(self, event: AlertEvent) -> None: ...

    def exit(self, event: ExitEvent) -> None: ...


class Engine:
    """The sampling loop and what it sets off: signals, alerts, records, the end of a tree.

    ``Supervisor`` adds the commands and the host's budget through the hooks at the end.
    """

    def __init__(
        self,
        config: Config,
        home: Home,
        records: RecordSink,
        *,
        clock: Callable[[], float] = time.monotonic,
        reap_orphans: bool = False,
        on_tick: Callable[[int], None] | None = None,
        tick_at_least_every_s: float | None = None,
        backstop: Backstop | None = None,
    ) -> None:
        self.config = config
        # The watchdog hears from the loop itself, so an idle loop must still turn this often.
        self.tick_at_least_every_s = tick_at_least_every_s
        self.backstop = backstop
        self.cgroup_status: dict[str, Any] = {"in_force": "off", "reason": "not detected"}
        self.home = home
        self.records = records
        self.bus: Broadcaster[Event] = Broadcaster()
        self.clock = clock
        self.reap_orphans = reap_orphans
        self.on_tick = on_tick
        self.agents: dict[str, Agent] = {}
        self.state_writer = StateWriter(
            home.state_file, self._state_entries, queue=self._queue_entries, clock=clock
        )
        self._kernel = (
            None
            if backstop is None
            else KernelWatch(backstop, clock, self._wake_up, self._carry_out)
        )
        self._sampler = Sampler()
        self._limiter = anyio.CapacityLimiter(1)
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self.schedule = Schedule(epoch=clock())
        self.last_sample_s = 0.0
        self.fast_samples = 0
        self.full_scans = 0
        self.loop_turns = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._sample_loop)
            tg.start_soon(self.state_writer.run)
            if self.reap_orphans:
                tg.start_soon(reaper.reap_on_sigchld, self._agent_pids)
            self._background(tg)
            task_status.started()

    # -- bookkeeping ------------------------------------------------------------------------

    def _register(self, agent: Agent) -> None:
        assert self._tg is not None, "Supervisor.run() must be started first"
        self.agents[agent.id] = agent
        self._tg.start_soon(self._watch_exit, agent)
        self._tg.start_soon(agent.child.output.drain)
        self._watch_kernel(agent)
        self.state_writer.request(force=True)
        self._wake.set()

    def _watch_kernel(self, agent: Agent) -> None:
        if self._kernel is not None and self._tg is not None:
            self._kernel.start(agent, self._tg)

    def _wake_up(self) -> None:
        self._wake.set()

    def _retire_later(self, cgroup: AgentCgroup) -> None:
        """Remove an agent's cgroup once the kernel lets go of it (off the event loop)."""
        if self.backstop is not None and self._tg is not None:
            self._tg.start_soon(self.backstop.retire, cgroup)

    def _state_entries(self) -> list[tuple[bool, dict[str, Any]]]:
        return [agent.state_entry() for agent in self.agents.values()]

    def _agent_pids(self) -> set[int]:
        return {a.child.pid for a in self.agents.values()}

    # -- the loop ---------------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        while True:
            self._wake = anyio.Event()
            self.loop_turns += 1
            now = self.clock()
            due = [a for a in self.agents.values() if self.schedule.due(a) <= now]
            sampled = True
            if self.schedule.full_scan_due(now, due, self.config, self._discovery_interval()):
                await self.sample_once()
            elif due:
                await self._sample_fast(due)
            else:
                sampled = False
            await self._after_turn(sampled)
            self.state_writer.request()
            if self.on_tick is not None:
                # The watchdog hears from this loop itself: if it stalls, systemd notices.
                self.on_tick(len(self.agents))
            delay = self.schedule.delay(self.agents.values(), self.clock())
            if self.tick_at_least_every_s is not None:
                delay = min(delay, self.tick_at_least_every_s)
            delay = min(delay, self._longest_wait())
            with anyio.move_on_after(delay):
                await self._wake.wait()

    def _discovery_interval(self) -> float:
        """How often all of /proc is scanned. Agents in a memory cgroup need no scan to find
        their members (the group lists them), only to reap orphans; others need one a tick."""
        if self.backstop is not None and all(a.cgroup for a in self.agents.values()):
            return max(DISCOVERY_INTERVAL_S, self.config.daemon.check_interval_s)
        return self.config.daemon.check_interval_s

    def request_full_scan(self) -> None:
        """Rediscover every tree now (an agent's own process ended: orphans to find)."""
        self.schedule.full_due = 0.0
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
            reaper.reap(result.orphan_zombies)

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
            agent.child.pid, agent.child.start, limits.metric, 0.9 * limits.warning_mb, agent.cgroup
        )

    def _apply_sample(self, agent: Agent, tree: TreeSample, now: float) -> None:
        step = tracker.apply_sample(
            agent.state,
            agent.tracking,
            agent.limits,
            now,
            tree.mb if tree.members else None,
            unchanged=tree.unchanged,
            exited=agent.exit is not None,
        )
        agent.state, agent.tracking = step.state, step.tracking
        if not step.skipped:
            agent.members = tree.members
            agent.sample = tree
        if tree.escaped:
            self._note_escapes(agent, tree)
        self._carry_out(agent, step.actions)
        if agent.exit is not None and not tree.members:
            self._finish(agent)
            return
        self.schedule.reschedule(agent, now, self.config)

    def _note_escapes(self, agent: Agent, tree: TreeSample) -> None:
        """Members that moved themselves out of the agent's cgroup stay in its tree (and are
        counted, by RSS); each is moved back where the kernel allows and reported once."""
        for pid, start in tree.escaped:
            if (pid, start) in agent.escapes or agent.cgroup is None:
                continue
            agent.escapes.add((pid, start))
            why = escape.bring_back(agent.cgroup, pid)
            back = "moved back" if why is None else f"could not be moved back: {why}"
            message = (
                f"pid {pid} of {agent.id} left its memory cgroup; its tree is still counted "
                f"({tree.mb:.1f} MB, by RSS from now on), {back}"
            )
            log.warning("cgroup_escape", subprocess_id=agent.id, pid=pid, moved_back=why is None)
            alert = Alert(AlertKind.CGROUP_ESCAPE, tree.mb, agent.limits.max_mb, message)
            self._publish_alert(agent.alert_event(alert, system_memory().as_dict()))

    async def _watch_exit(self, agent: Agent) -> None:
        with anyio.CancelScope() as agent.exit_scope:
            agent.exit = await launcher.wait_exit(agent.child)
        if agent.exit is None:  # let go (`unwatch`): its process is not ours to see end
            launcher.release(agent.child)
            return
        # Whether a signal that ended it could be the daemon's (a restart policy's failure).
        agent.signalled_before_exit = agent.signalled_at is not None
        log.info("agent_exited", subprocess_id=agent.id, status=agent.exit.describe())
        # What the agent leaves behind is stopped too: an orphaned helper is still its tree.
        agent.state, actions = policy.root_exited(
            agent.state, self.clock(), agent.limits.term_grace_s
        )
        self._carry_out(agent, actions)
        self.request_full_scan()

    # -- actions ----------------------------------------------------------------------------

    def _carry_out(self, agent: Agent, actions: list[Action]) -> None:
        # Signals first: the records can wait a millisecond, a tree at its limit cannot.
        for action in actions:
            if isinstance(action, Signal):
                self._send(agent, action)
        for action in actions:
            if isinstance(action, Alert):
                self._publish_alert(agent.alert_event(action, system_memory().as_dict()))
                if action.kind in ENDING_ALERTS:
                    self._tell(agent, action.message)

    def _send(self, agent: Agent, action: Signal) -> None:
        if agent.signalled_at is None:
            agent.signalled_at = self.clock()
        pid = agent.child.pid
        sent = enforcer.signal_agent(
            agent.child.pidfd, pid, agent.members, action.signal, agent.cgroup
        )
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

    def _tell(self, agent: Agent, message: str) -> None:
        """One line on the terminal of an agent started with `claude-pm run`: why it ends."""
        if agent.notify is None:
            return
        why = message.split(": ", 1)[1] if message[:1].isupper() and ": " in message else message
        with suppress(OSError, ValueError):
            agent.notify.write(f"claude-pm: {agent.id} stopped: {why}\n")
            agent.notify.close()
        agent.notify = None

    def _publish_alert(self, event: AlertEvent) -> None:
        self.records.alert(event)
        log.warning(
            "memory_alert",
            subprocess_id=event.subprocess_id,
            alert_event=event.kind.value,
            message=event.message,
        )
        self.bus.publish(event)

    def _finish(self, agent: Agent) -> None:
        assert agent.exit is not None
        now = self.clock()
        peak_mb = None
        if agent.cgroup is not None:
            with suppress(OSError):
                # The kernel's own high-water mark of the tree: every byte, never sampled.
                peak = agent.cgroup.peak_bytes()
                if peak is not None:
                    peak_mb = round(peak / MIB, 1)
        gone_s = None if agent.signalled_at is None else round(now - agent.signalled_at, 4)
        agent.child.output.finish()  # its log is whole before its record says it ended
        event = self._closing(
            agent, agent.exit_event(now, cgroup_peak_mb=peak_mb, term_to_gone_s=gone_s)
        )
        self.records.exit(event)
        agent.final = event
        del self.agents[agent.id]
        self._sampler.forget(agent.id)
        if agent.cgroup_scope is not None:
            agent.cgroup_scope.cancel()
        log.info(
            "agent_finished",
            subprocess_id=agent.id,
            reason=event.reason.value,
            peak_mb=round(agent.state.peak_mb, 1),
        )
        self.bus.publish(event)  # before what follows from it (a restart, say)
        if not self._ended(agent, event) and agent.cgroup is not None:
            self._retire_later(agent.cgroup)
        self.state_writer.request(force=True)
        self._wake.set()  # its memory is back: a queued launch may fit now
        agent.done.set()

    # -- hooks --------------------------------------------------------------------------------

    def _background(self, tg: TaskGroup) -> None:
        """Start what else runs as long as the loop does."""

    async def _after_turn(self, sampled: bool) -> None:
        """After each turn of the loop; ``sampled``: some tree was measured."""

    def _longest_wait(self) -> float:
        """How long the loop may sleep at most, whatever the agents' schedule says."""
        return float("inf")

    def _queue_entries(self) -> dict[str, list[dict[str, Any]]]:
        """What waits to run, by run/state.json section (``queue``, ``restarts``, ...)."""
        return {}

    def _closing(self, agent: Agent, event: ExitEvent) -> ExitEvent:
        """An agent's tree is gone: its stats record, as it is about to be written."""
        return event

    def _ended(self, agent: Agent, event: ExitEvent) -> bool:
        """An agent's tree is gone and its record written; True: its cgroup is taken care
        of (else it is retired)."""
        return False
