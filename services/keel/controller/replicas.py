"""Several actors of one role sharing each batch (`reward.replicas`, `reference.replicas`).

A batch of B samples is cut into contiguous shards, one per actor; the actors work on their
shards concurrently and the results are joined in batch order. N actors therefore give what one
gives: (B,) scores, (B, R) reference log-probs. `Trajectories.select` keeps the batch's prompt
width P and response width R, so a shard's log-probs line up with the batch's columns.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from keel.config import RunConfig, reference_path
from keel.controller.actors import remote
from keel.controller.placement import in_group
from keel.trajectory import Trajectories


def shard_rows(batch: int, replicas: int) -> list[range]:
    """Contiguous row ranges covering 0..batch-1, sizes differing by at most one (the first ones
    larger). None is empty: a batch smaller than `replicas` uses `batch` actors."""
    n = max(1, min(batch, replicas))
    size, extra = divmod(batch, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def shard(traj: Trajectories, replicas: int) -> list[Trajectories]:
    """The batch cut as `shard_rows` says; the batch itself when one actor takes it all."""
    rows = shard_rows(len(traj), replicas)
    if len(rows) == 1:
        return [traj]
    return [traj.select(list(r)) for r in rows]


class Joined:
    """The futures of a batch's shards; `result()` concatenates their tensors in batch order (dim 0)."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def result(self) -> torch.Tensor:
        return torch.cat([f.result() for f in self.futures])


# --------------------------------------------------------------------------- starting them


# Ray starts a lost reward or reference actor again, as often as it is lost: they hold no state,
# and the supervisor bounds how often one call is sent again (keel.controller.supervisor).
ALWAYS = -1


def start_rewards(cfg: RunConfig, group, envs: list[dict[str, str]], max_request_samples: int) -> list:
    """`reward.replicas` reward actors, one per bundle of the role's placement group, actor i with
    process environment envs[i]: RewardModel (reward channel objectstore) or RewardServerRole, the
    reward core behind a RewardService in its own actor (grpc); either calls the reward servers among
    reward.sources with transport.grpc's token and TLS. None when an external server scores
    (transport.grpc.reward_address)."""
    from keel.reward.model import RewardModel
    from keel.reward.server import RewardServerRole

    if cfg.transport.grpc.reward_address is not None:
        return []
    resources = cfg.reward.resources
    if cfg.transport.reward == "grpc":
        return [
            remote(RewardServerRole, resources, envs[i], in_group(group, i), ALWAYS).remote(
                cfg.reward, cfg.transport.grpc, max_request_samples
            )
            for i in range(cfg.reward.replicas)
        ]
    return [
        remote(RewardModel, resources, envs[i], in_group(group, i), ALWAYS).remote(cfg.reward, cfg.transport.grpc)
        for i in range(cfg.reward.replicas)
    ]


def start_references(cfg: RunConfig, group, envs: list[dict[str, str]], temperature: float) -> list:
    """`reference.replicas` reference actors, one per bundle of the role's placement group, actor i
    with process environment envs[i]."""
    from keel.reference.model import ReferenceModel

    ref = cfg.reference
    return [
        remote(ReferenceModel, ref.resources, envs[i], in_group(group, i), ALWAYS).remote(
            reference_path(cfg), cfg.model.dtype, ref.micro_batch_size, temperature, cfg.model.precision
        )
        for i in range(ref.replicas)
    ]
