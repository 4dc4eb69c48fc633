"""Placement: one Ray placement group per role, with a clear error instead of a hang when the
cluster cannot hold what the config asks for."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from keel.config import Resources, RunConfig, reference_on_learner


class PlacementError(RuntimeError):
    """The cluster cannot place a role: says which role, what it asked for, what the cluster has."""


@dataclass(frozen=True)
class RoleRequest:
    role: str  # "rollout", "reward", "reference", "learner"
    replicas: int
    resources: Resources

    def bundle(self) -> dict[str, float]:
        """One replica's Ray resource bundle (zero amounts left out: Ray rejects them)."""
        r = self.resources
        out = {"CPU": r.num_cpus, "GPU": r.num_gpus, **r.custom}
        if r.memory_gb:
            out["memory"] = r.memory_gb * 2**30
        return {k: v for k, v in out.items() if v > 0}

    def total(self) -> dict[str, float]:
        return {k: v * self.replicas for k, v in self.bundle().items()}


def role_requests(cfg: RunConfig) -> list[RoleRequest]:
    """What a run places, a bundle per replica: rollout, learner, the reward (unless an external
    server scores) and the reference (when enabled, and not computed by the learner: model.lora)."""
    requests = [
        RoleRequest("rollout", cfg.rollout.replicas, cfg.rollout.resources),
        RoleRequest("learner", cfg.learner.replicas, cfg.learner.resources),
    ]
    if cfg.transport.grpc.reward_address is None:
        requests.append(RoleRequest("reward", cfg.reward.replicas, cfg.reward.resources))
    if cfg.reference.enabled and not reference_on_learner(cfg):
        requests.append(RoleRequest("reference", cfg.reference.replicas, cfg.reference.resources))
    return requests


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"


def _free(wanted: dict[str, float]) -> str:
    """What the cluster has free of the resources a request names (0 when none is left), leaving
    out Ray's internal ones (placement-group bundles, node ids, object store)."""
    import ray

    available = {k: float(v) for k, v in ray.available_resources().items()}
    shown = {k: available.get(k, 0.0) for k in wanted}
    shown |= {k: v for k, v in available.items() if k in ("CPU", "GPU")}
    return _fmt({k: (v / 2**30 if k == "memory" else v) for k, v in shown.items()})


def check_fits(requests: list[RoleRequest], cluster_total: dict[str, float]) -> None:
    """Raise PlacementError naming the first role that cannot fit in what the cluster has in all.

    Roles are placed in order; each takes its share of every resource. This catches a config
    that can never run (a resource the cluster lacks, or too much of one) before any actor starts.
    """
    remaining = dict(cluster_total)
    for req in requests:
        for name, amount in req.total().items():
            have = remaining.get(name, 0.0)
            if amount > have + 1e-9:
                asked = f"{req.replicas} x {{{_fmt(req.bundle())}}}"
                raise PlacementError(
                    f"cannot place role {req.role!r}: it asks for {asked} = {name} {amount:g}, "
                    f"but only {name} {have:g} is left of the cluster's {_fmt(cluster_total)} "
                    f"after the roles before it"
                )
            remaining[name] = have - amount


def place_roles(requests: list[RoleRequest], timeout_s: float) -> dict[str, object]:
    """Create one placement group per role (a bundle per replica) and wait until each is ready.

    Returns {role: placement group}. On a timeout every group is removed and PlacementError says
    which role was waiting and what the cluster has free.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_fits(requests, {k: float(v) for k, v in ray.cluster_resources().items()})
    groups: dict[str, object] = {}
    try:
        for req in requests:
            # names are cluster-wide: two jobs, or two scale-ups, must not collide
            name = f"keel-{req.role}-{uuid.uuid4().hex[:8]}"
            pg = placement_group([req.bundle()] * req.replicas, strategy="PACK", name=name)
            groups[req.role] = pg
            if not pg.wait(timeout_seconds=timeout_s):
                raise PlacementError(
                    f"cannot place role {req.role!r}: {req.replicas} x {{{_fmt(req.bundle())}}} not available "
                    f"after {timeout_s:g}s; the cluster has free {_free(req.bundle())} (memory in GiB)"
                )
    except BaseException:
        for pg in groups.values():
            remove_placement_group(pg)
        raise
    return groups


def in_group(pg, index: int) -> dict:
    """Actor options that pin an actor to bundle `index` of placement group `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)
    }


def node_cpus(pg, index: int) -> int:
    """The CPUs Ray counts on the node holding bundle `index` of `pg` (the node's `num_cpus`, which
    is the pod's CPU limit under KubeRay, not the host's core count)."""
    import ray
    from ray.util.placement_group import placement_group_table

    node_id = placement_group_table(pg)["bundles_to_node_id"][index]
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return max(1, int(node["Resources"].get("CPU", 1)))
    raise RuntimeError(
        f"bundle {index} of placement group {pg.id.hex()} is on node {node_id}, which Ray no longer lists"
    )


def rendezvous(pg, index: int, timeout_s: float = 60.0) -> tuple[str, int]:
    """(node IP, free port) on the node holding bundle `index` of `pg`: where rank 0 of a process
    group listens, so ranks on other nodes can reach it. Asked by a zero-CPU task in that bundle,
    within `timeout_s`."""
    import ray

    @ray.remote(num_cpus=0)
    def probe() -> tuple[str, int]:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    return ray.get(probe.options(**in_group(pg, index)).remote(), timeout=timeout_s)
