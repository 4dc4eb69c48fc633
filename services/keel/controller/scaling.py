"""The autoscaling rule for rollout workers: keep the time a step waits for rollout near a target.

In sync mode the wait is the rollout phase itself; in async mode it is how long the controller
blocks collecting the batch that generated while the last step trained. A wait above the target
for `patience` steps in a row adds a worker; a wait under a quarter of it for `patience` steps
removes one; always within [min_replicas, max_replicas].

Whichever decides the number (this rule or `keel scale`), `request_capacity` tells Ray's
autoscaler the size of the run it should make room for, so that on an autoscaling cluster (KubeRay's
rollout worker group, Ray's cluster launcher) a node comes up for a new worker and an idle one goes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from keel.config import AutoscaleConfig, RunConfig
from keel.controller.placement import role_requests


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


def capacity_bundles(cfg: RunConfig, rollout_workers: int) -> list[dict[str, float]]:
    """A bundle per replica of every role the run places, with `rollout_workers` rollout workers:
    the shapes the cluster must be able to hold at once (custom resources such as {"rollout": 1}
    included, so the autoscaler picks the node group that has them)."""
    bundles = []
    for req in role_requests(cfg):
        if req.role == "rollout":
            req = replace(req, replicas=rollout_workers)
        bundles += [req.bundle()] * req.replicas
    return bundles


def request_capacity(cfg: RunConfig, rollout_workers: int) -> None:
    """Ask Ray's autoscaler to keep room for the run with `rollout_workers` rollout workers.

    `ray.autoscaler.sdk.request_resources` sets a floor on the cluster's size: nodes are added
    until these bundles fit, at once and without the usual upscaling pace, and a node that is idle
    and not needed for them is removed after the cluster's idle timeout. So a larger number brings
    rollout nodes up while the new workers' placement groups wait (controller.placement_timeout_s
    must cover a node's start), and a smaller one lets the freed nodes go. Each call replaces the
    last one, cluster-wide: two runs sharing a cluster overwrite each other's floor. Without an
    autoscaler the request is recorded and nothing else happens.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=capacity_bundles(cfg, rollout_workers))
