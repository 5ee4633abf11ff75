"""The supervisor: what clients ask of the engine, the budget and the restart policies.

Launches are admitted into the budget, queued, refused, or held until the agents they wait
for have ended; commands stop, restart, cancel and list. ``Fleet`` holds every agent to the
host's budget; ``Lifecycle`` decides what follows each run; ``Adoption`` watches trees that
others started.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, NoReturn

import anyio
import structlog

from supervisord.config.settings import Config
from supervisord.core import budget as budgeting
from supervisord.core import policy, resume
from supervisord.core.errors import (
    CgroupError,
    ConfigError,
    LaunchError,
    LaunchRefused,
    NotFoundError,
    SupervisordError,
)
from supervisord.core.events import ExitEvent
from supervisord.core.kinds import EndReason, EventType
from supervisord.core.lineage import Lineage
from supervisord.core.records import AgentRecord
from supervisord.core.restart import RestartPolicy
from supervisord.host import launcher
from supervisord.host.agentlog import OutputPlace
from supervisord.host.statefile import State
from supervisord.host.sysmem import system_memory
from supervisord.supervise import launchplan, recovery
from supervisord.supervise.admission import Queued, Waiting, queue_event
from supervisord.supervise.adoption import Adoption
from supervisord.supervise.after import cancelled_outcome
from supervisord.supervise.agent import Agent
from supervisord.supervise.launchplan import LaunchRequest

log = structlog.get_logger("supervisord.supervise.supervisor")


class Supervisor(Adoption):
    # -- launching ----------------------------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> Agent | Queued:
        """Start an agent now if it fits the host's budget; else queue it (or refuse it,
        when it may not wait or could never fit). ``force`` starts it regardless. One
        ``after`` others waits until they have ended with exit code 0."""
        assert self._tg is not None, "Supervisor.run() must be started first"
        waiting = self._plan(request)
        pending = self.pending_after(request.after)
        if pending:
            self.dependencies.add(waiting, pending)
            reason = f"waits for {', '.join(pending)} to end with exit code 0"
            log.info("launch_waits", subprocess_id=waiting.subprocess_id, after=pending)
            self.bus.publish(queue_event(EventType.QUEUED, waiting, reason))
            await self.state_writer.written()
            return Queued(waiting, 0)
        return await self._admit(waiting)

    async def _admit(self, waiting: Waiting) -> Agent | Queued:
        request = waiting.request
        if not request.force:
            never = budgeting.never_fits(self.admission.budget, waiting.request_mb)
            if never is not None:
                self._refuse(waiting, f"launch of {request.agent_type} refused: {never}")
            verdict = self.admission.check(waiting, self._claims(), self._available())
            if not verdict.fits:
                if not request.queue:
                    refused = f"launch of {request.agent_type} refused (no queueing): it"
                    self._refuse(waiting, f"{refused} {verdict.reason}")
                return await self._enqueue(waiting, verdict.reason)
        return await self._start(waiting)

    def _plan(self, request: LaunchRequest) -> Waiting:
        """Everything about a launch decided before it starts or waits."""
        limits = self.config.limits_for(request.agent_type, request.limits)
        scheduling = self.config.scheduling_for(request.agent_type, request.scheduling)
        self.config.restart_for(request.agent_type, request.restart)  # refused here if bad
        command = launchplan.resolve_command(self.config, request, self.home.config_file)
        subprocess_id = launcher.new_subprocess_id(request.agent_type)
        request_mb = self.admission.request_mb(request.agent_type, scheduling, limits)
        return self.admission.waiting(subprocess_id, request, command, scheduling, request_mb)

    def _refuse(self, waiting: Waiting, message: str) -> NoReturn:
        request = waiting.request
        refusal = launchplan.Refusal(
            request.agent_type, waiting.request_mb, message, request.owner_uid
        )
        self._publish_alert(refusal.alert(waiting.subprocess_id, system_memory().as_dict()))
        raise LaunchRefused(message)

    async def _start(self, waiting: Waiting) -> Agent:
        request, subprocess_id, lineage = waiting.request, waiting.subprocess_id, waiting.lineage
        # The limits and policy in force now: a launch that waited gets a reload meanwhile.
        limits = self.config.limits_for(request.agent_type, request.limits)
        restart = self.config.restart_for(request.agent_type, request.restart)
        values = lineage.values(subprocess_id, request.task)
        command = resume.run_command(waiting.command, restart.resume_command, lineage.run, values)
        cgroup = None if self.backstop is None else self.backstop.create(subprocess_id, limits)
        log_path = self.home.agent_log(subprocess_id)
        spec = launchplan.spec_for(
            self.config,
            request,
            subprocess_id,
            command,
            log_path,
            cgroup,
            run_env=_run_environment(lineage),
            banner=_banner(subprocess_id, lineage),
        )
        try:
            child = launcher.spawn(spec, OutputPlace.of(self.home, self.config.daemon))
        except (LaunchError, CgroupError):
            # Nothing runs in the group yet (placement failed, or the spawn): it must go too.
            if cgroup is not None:
                cgroup.remove()
            raise
        now = self.clock()
        agent = Agent.launched(
            request,
            subprocess_id,
            command,
            child,
            limits,
            cgroup,
            now,
            scheduling=waiting.scheduling,
            request_mb=waiting.request_mb,
            template=waiting.command,
            lineage=lineage,
            restart=restart,
        )
        self._capture_session(agent)
        self._register(agent)
        await self.state_writer.written()
        log.info("agent_launched", subprocess_id=subprocess_id, pid=child.pid, run=lineage.run)
        self.bus.publish(agent.launch_event(now))
        self.started(agent, waiting.reason)
        return agent

    def _capture_session(self, agent: Agent) -> None:
        """Watch the agent's output for its own session id (``session_pattern``)."""
        pattern = agent.restart.session_pattern
        if pattern is None:
            return
        capture = resume.SessionCapture(pattern)

        def feed(chunk: bytes) -> None:
            found = capture.feed(chunk)
            if found is not None and found != agent.lineage.session_id:
                agent.lineage = agent.lineage.captured(found)
                log.info("session_captured", subprocess_id=agent.id, session_id=found)
                self.state_writer.request()

        agent.child.output.tap = feed

    # -- the queue and what waits -------------------------------------------------------------

    def cancel(self, subprocess_id: str, reason: str = "cancelled") -> Waiting:
        """Take a launch out of the queue, or out of its wait for others."""
        if subprocess_id in self.dependencies:
            waiting = self.dependencies.cancel(subprocess_id)
        else:
            waiting = self.admission.cancel(subprocess_id)
        self.state_writer.request(force=True)
        log.info("launch_cancelled", subprocess_id=subprocess_id, reason=reason)
        self.bus.publish(queue_event(EventType.CANCELLED, waiting, reason))
        self._final(cancelled_outcome(waiting, reason))
        return waiting

    def restore_waiting(self, state: State) -> None:
        """Launches a previous daemon left waiting (queued, due again after a restart delay,
        or waiting for others); each goes ahead once it may."""
        offset = self.wall_offset()
        restored, problems = self.admission.restore(state.queue, offset)
        for waiting in restored:
            log.info("launch_restored", subprocess_id=waiting.subprocess_id)
        problems += self.restarts.restore(state.restarts, 1, offset)
        problems += self.dependencies.restore(state.after, 1, offset)
        problems += self.dependencies.restore_ended(state.ended, 1, offset)
        for problem in problems:
            log.error("state_unreadable", problem=problem)
        self._wake.set()

    def adopt(self, records: list[AgentRecord]) -> None:
        """Carry on supervising agents a previous daemon left running (after a crash or a
        ``shutdown --leave-agents``); record those that ended meanwhile as ``lost``."""
        place = OutputPlace.of(self.home, self.config.daemon)
        for record in records:
            outcome = recovery.resume(record, self.config, self.backstop, place, self.clock())
            if isinstance(outcome, recovery.Lost):
                if outcome.cgroup is not None:
                    self._retire_later(outcome.cgroup)
                self.records.exit(outcome.event)
                self.bus.publish(outcome.event)
                log.warning("agent_lost", subprocess_id=record.subprocess_id, pid=record.pid)
                continue
            agent = outcome.agent
            self._sampler.remember(agent.id, agent.members)
            self._capture_session(agent)
            self._register(agent)
            self._carry_out(agent, outcome.actions)
            log.info("agent_adopted", subprocess_id=agent.id, pid=agent.child.pid)

    def adopt_leftovers(self) -> None:
        """Trees in agent cgroups that state.json does not name: the usual escalation, then a
        stats record with reason ``lost``."""
        if self.backstop is not None:
            self.adopt(recovery.leftover_records(self.backstop, self.config))

    # -- what clients ask of running agents ---------------------------------------------------

    def get(self, subprocess_id: str) -> Agent:
        try:
            return self.agents[subprocess_id]
        except KeyError:
            if subprocess_id in self.restarts:
                raise NotFoundError(
                    f"{subprocess_id} runs no run now: its next is due (see `claude-pm queue`)"
                ) from None
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
    ) -> ExitEvent:
        """End one agent with the usual escalation; its stats record once the tree is gone."""
        agent = self.get(subprocess_id)
        grace = agent.limits.term_grace_s if grace_s is None else grace_s
        agent.state, actions = policy.request_end(agent.state, self.clock(), reason, grace)
        self._carry_out(agent, actions)
        self._wake.set()
        await agent.done.wait()
        assert agent.final is not None
        return agent.final

    async def restart(self, subprocess_id: str, grace_s: float | None = None) -> dict[str, Any]:
        """End the run with the usual escalation and start the next at once (same id and
        session); an agent between runs starts its next now, a failed one again."""
        if subprocess_id in self.restarts:
            return self.restart_pending_now(subprocess_id)
        if subprocess_id not in self.agents and (
            failed := self.dependencies.take_failed(subprocess_id)
        ):
            assert failed.again is not None
            run = failed.again.lineage.run
            log.info("failed_restarted", subprocess_id=subprocess_id, run=run)
            try:
                await self._admit(failed.again)
            except SupervisordError:
                self.dependencies.remember(failed)
                raise
            return {"subprocess_id": subprocess_id, "run": run, "ended": None}
        if self.get(subprocess_id).request is None:
            raise LaunchError(
                f"{subprocess_id} was adopted without its launch (its state was lost): "
                "there is nothing to run again; stop it and launch anew"
            )
        ended = await self.stop(subprocess_id, grace_s, EndReason.RESTART)
        return {"subprocess_id": subprocess_id, "run": ended.run + 1, "ended": ended.record()}

    async def stop_all(self, reason: EndReason = EndReason.DAEMON_SHUTDOWN) -> None:
        self.end_all_restarts()
        async with anyio.create_task_group() as tg:
            for subprocess_id in list(self.agents):
                tg.start_soon(self._stop_quietly, subprocess_id, reason)

    def apply_config(self, config: Config) -> None:
        """New thresholds for running agents (``reload``); their launch overrides still win."""
        for agent in self.agents.values():
            before, agent.limits = (
                agent.limits,
                config.limits_for(agent.agent_type, agent.overrides),
            )
            if self.backstop is not None and agent.cgroup is not None and agent.limits != before:
                # The ceiling moves (or goes, while monitoring is disabled), and the usage
                # threshold registered at launch is registered again at the new max_mb.
                self.backstop.apply(agent.cgroup, agent.limits)
                self._watch_kernel(agent)
            agent.next_due = self.clock()  # held to the new limits at once, not at next tick
            agent.restart = _policy(config, agent)
        self._apply_host(config)
        self.config = config
        self._wake.set()

    async def _stop_quietly(self, subprocess_id: str, reason: EndReason) -> None:
        with suppress(NotFoundError):  # It may have ended on its own meanwhile.
            await self.stop(subprocess_id, reason=reason)


def _policy(config: Config, agent: Agent) -> RestartPolicy:
    """A running agent's restart policy under a new config: its type's, then its launch's
    own keys (kept as they were when those no longer fit the type's new section)."""
    overrides = {} if agent.request is None else agent.request.restart
    try:
        return config.restart_for(agent.agent_type, overrides)
    except ConfigError:
        return agent.restart


def _run_environment(lineage: Lineage) -> dict[str, str]:
    """What each run is told of itself, so that an agent can tell a resume from a start."""
    return {
        "CLAUDE_PM_RUN": str(lineage.run),
        "CLAUDE_PM_RESTARTS": str(lineage.runs.restarts),
        "CLAUDE_PM_SESSION_UUID": lineage.session_uuid,
    }


def _banner(subprocess_id: str, lineage: Lineage) -> str | None:
    """The agent log's line between one run and the next."""
    if lineage.run == 1:
        return None
    at = datetime.now(UTC).isoformat(timespec="seconds")
    run, restarts = lineage.run, lineage.runs.restarts
    return f"----- claude-pm: {subprocess_id} run {run} (restart {restarts}) at {at} -----"
