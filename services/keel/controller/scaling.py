"""The autoscaling rule for rollout workers: keep the time a step waits for rollout near a target.

In sync mode the wait is the rollout phase itself; in async mode it is how long the controller
blocks collecting the batch that generated while the last step trained. A wait above the target
for `patience` steps in a row adds a worker; a wait under a quarter of it for `patience` steps
removes one; always within [min_replicas, max_replicas].
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.config import AutoscaleConfig


@dataclass
class Autoscaler:
    cfg: AutoscaleConfig
    over: int = 0  # consecutive steps above the target
    under: int = 0  # consecutive steps under a quarter of it

    def decide(self, replicas: int, wait_s: float) -> int:
        """The worker count for the next step, after a step that waited `wait_s` for rollout."""
        c = self.cfg
        if wait_s > c.target_wait_s:
            self.over, self.under = self.over + 1, 0
        elif wait_s < c.target_wait_s / 4:
            self.over, self.under = 0, self.under + 1
        else:
            self.over = self.under = 0
        if self.over >= c.patience and replicas < c.max_replicas:
            self.over = 0
            return replicas + 1
        if self.under >= c.patience and replicas > c.min_replicas:
            self.under = 0
            return replicas - 1
        return replicas
