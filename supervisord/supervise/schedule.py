"""When each agent is looked at next, and when the sampling loop must wake.

Idle agents share one tick per ``check_interval_s`` (a fleet launched over minutes is still
read in one batch); an agent whose headroom divided by its growth rate is short is looked at
sooner, from ``cadence.next_delay``; deadlines of the policy (a grace period or a timeout
running out) wake the loop on their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from supervisord.config.settings import Config
from supervisord.core import cadence, policy
from supervisord.supervise.agent import Agent


@dataclass
class Schedule:
    epoch: float
    full_due: float = 0.0  # when the next full /proc scan is due

    def tick_after(self, now: float, interval_s: float) -> float:
        """The common tick after ``now``."""
        return self.epoch + (math.floor((now - self.epoch) / interval_s) + 1) * interval_s

    def full_scan_due(self, now: float, due: list[Agent], config: Config, every_s: float) -> bool:
        """Whether this turn scans all of /proc; if so, books the next scan ``every_s`` on.

        Agents due just before the next full scan wait for it: no tree is read twice.
        """
        fold = config.daemon.min_interval_s
        if now >= self.full_due or (due and self.full_due - now <= fold):
            interval = config.daemon.check_interval_s
            self.full_due = self.tick_after(now + every_s - interval, interval)
            return True
        return False

    def reschedule(self, agent: Agent, now: float, config: Config) -> None:
        interval = config.daemon.check_interval_s
        age = now - agent.state.started_at
        delay = cadence.next_delay(
            agent.tracking.growth, agent.limits, age, config.daemon.min_interval_s, interval
        )
        agent.next_due = self.tick_after(now, interval) if delay >= interval else now + delay

    @staticmethod
    def due(agent: Agent) -> float:
        deadline = policy.next_deadline(agent.state, agent.limits)
        return agent.next_due if deadline is None else min(agent.next_due, deadline)

    def delay(self, agents: Iterable[Agent], now: float) -> float:
        """Seconds the loop may sleep before something is due."""
        wake = self.full_due
        for agent in agents:
            wake = min(wake, self.due(agent))
        return max(0.0, wake - now)
