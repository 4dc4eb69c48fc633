"""Sharding a batch over a role's replicas: contiguous, in order, nothing lost, none empty."""

from concurrent.futures import Future

import pytest
import torch

from keel.controller.replicas import Joined, shard, shard_rows
from keel.trajectory import Trajectories


@pytest.mark.parametrize("batch, replicas", [(7, 2), (8, 2), (16, 3), (3, 5), (1, 4), (5, 1)])
def test_shards_are_contiguous_balanced_and_cover_the_batch(batch, replicas):
    rows = shard_rows(batch, replicas)
    assert [i for r in rows for i in r] == list(range(batch))
    assert len(rows) == min(batch, replicas) and all(len(r) > 0 for r in rows)
    assert max(map(len, rows)) - min(map(len, rows)) <= 1


def _traj(lengths, R=5):
    B = len(lengths)
    mask = torch.arange(R).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return Trajectories(
        rollout_id="r",
        weight_version=0,
        prompt_ids=[str(i) for i in range(B)],
        sample_index=[0] * B,
        prompt_tokens=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_tokens=torch.arange(B * R).view(B, R),
        response_mask=mask,
        behaviour_logprobs=-torch.rand(B, R) * mask,
        prompts=["p"] * B,
        responses=[f"r{i}" for i in range(B)],
    )


def test_shards_keep_the_batch_width_and_join_in_order():
    traj = _traj([5, 1, 2, 1, 3])  # the second shard's longest response is 3 tokens, R stays 5
    parts = shard(traj, 2)
    assert [p.responses for p in parts] == [["r0", "r1", "r2"], ["r3", "r4"]]
    assert all(p.response_tokens.shape[1] == 5 for p in parts)
    futures = []
    for p in parts:  # a per-sample computation on each shard, joined
        f = Future()
        f.set_result(p.behaviour_logprobs * 2)
        futures.append(f)
    assert torch.equal(Joined(futures).result(), traj.behaviour_logprobs * 2)
    assert len(shard(traj, 1)) == 1 and shard(traj, 1)[0] is traj  # one actor: the batch itself
