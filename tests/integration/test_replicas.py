"""reward.replicas and reference.replicas on real Ray actors: two actors sharing a batch give what
one gives, and each of them scores its shard. Over the object store (RewardModel actors) and over
gRPC (RewardServerRole actors, a RewardClient each), and for the reference log-probs. The reward
actors score two sources and return each one's raw scores, (B, 2), joined in batch order."""

from __future__ import annotations

import pytest
import ray
import torch

from keel.config import (
    ControllerConfig,
    GrpcConfig,
    ModelConfig,
    Resources,
    RewardConfig,
    RewardFunctionSource,
    RolloutConfig,
    SamplingConfig,
)
from keel.controller.actors import remote
from keel.controller.channels import ActorReward, GrpcReward
from keel.controller.supervisor import StatelessRole
from keel.data.prompts import Prompt
from keel.data.tasks import arithmetic_rows

SMALL = Resources(num_cpus=0.25)


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """7 sampled answers to addition prompts (odd, so the shards are 4 and 3) of several lengths."""
    from keel.rollout.worker import RolloutWorker

    worker = RolloutWorker(ModelConfig(policy=str(tiny_model_dir)), RolloutConfig(backend="hf"), 64, seed=0)
    tok = worker.tokenizer
    prompts = [
        Prompt(str(i), row["prompt"], tuple(tok(row["prompt"]).input_ids), {"answer": row["answer"]})
        for i, row in enumerate(arithmetic_rows(7, seed=5, max_operand=20))
    ]
    traj = worker.generate(prompts, seed=1, sampling=SamplingConfig(temperature=1.0, max_new_tokens=6))
    assert len(traj) == 7 and len(set(traj.prompt_mask.sum(-1).tolist())) > 1  # left padding in the batch
    return traj


# two sources: each actor returns both columns of its shard, raw (the controller combines)
REWARD = RewardConfig(
    sources=[
        RewardFunctionSource(function="keel.reward.rules:arithmetic"),
        RewardFunctionSource(function="keel.reward.rules:length_penalty", weight=-2.0, normalize="whiten"),
    ]
)


def _answered(traj):
    """The batch with responses that score 1 (right sum), 0.1 (a wrong number), 0 (no number) in
    turn, and lengths 1-2, 2 and 2 characters (-1/8 or -2/8 by length), so shards joined out of
    order would show; and the (B, 2) raw scores of the two sources."""
    responses = [[m["answer"], "99", "no"][i % 3] for i, m in enumerate(traj.metadata)]
    expected = [[[1.0, 0.1, 0.0][i % 3], -len(r) / 8] for i, r in enumerate(responses)]
    return traj.with_fields(responses=responses), torch.tensor(expected)


def _counts(actors) -> list[int]:
    return ray.get([a.samples_scored.remote() for a in actors])


def _scored_alone_then_shared(make_channel, actors, traj):
    """(scores by actors[0] alone, scores by both, what each actor scored in the shared call)."""
    alone = make_channel(actors[:1]).submit(traj, ray.put(traj), 0).result()
    before = _counts(actors)
    shared = make_channel(actors).submit(traj, ray.put(traj), 0).result()
    return alone, shared, [after - b for after, b in zip(_counts(actors), before, strict=True)]


def test_two_reward_actors_score_like_one(ray_session, batch):
    from keel.reward.model import RewardModel

    actors = [remote(RewardModel, SMALL).remote(REWARD) for _ in range(2)]
    traj, expected = _answered(batch)
    try:
        alone, shared, work = _scored_alone_then_shared(
            lambda subset: ActorReward(StatelessRole("reward", subset, ControllerConfig())), actors, traj
        )
    finally:
        for a in actors:
            ray.kill(a)
    assert torch.equal(alone, expected) and torch.equal(shared, expected)
    assert work == [4, 3]


def test_two_reward_servers_score_like_one(ray_session, batch):
    from keel.reward.client import RewardClient
    from keel.reward.server import RewardServerRole

    grpc_cfg = GrpcConfig(auth=False)
    actors = [remote(RewardServerRole, SMALL).remote(REWARD, grpc_cfg, 16) for _ in range(2)]
    channels = {}

    def channel(subset):
        clients = [RewardClient(grpc_cfg, ray.get(a.address.remote())) for a in subset]
        reward_channel = GrpcReward(clients, REWARD, subset)
        channels[len(subset)] = reward_channel
        return reward_channel

    traj, expected = _answered(batch)
    try:
        alone, shared, work = _scored_alone_then_shared(channel, actors, traj)
    finally:
        for reward_channel in channels.values():
            reward_channel.close()
        for a in actors:
            ray.kill(a)
    assert torch.equal(alone, expected) and torch.equal(shared, expected)
    assert work == [4, 3]


class _reference:
    """The reference role as the loop calls it: log-probs of each actor's shard."""

    def __init__(self, actors):
        self.role = StatelessRole("reference", actors, ControllerConfig())

    def submit(self, traj, traj_ref, step):
        return self.role.submit(traj, traj_ref, "logprobs", step)


def test_two_reference_actors_give_the_same_logprobs(ray_session, batch, tiny_model_dir):
    from keel.reference.model import ReferenceModel

    actors = [remote(ReferenceModel, SMALL).remote(str(tiny_model_dir), "float32", 2) for _ in range(2)]
    try:
        alone, shared, work = _scored_alone_then_shared(_reference, actors, batch)
    finally:
        for a in actors:
            ray.kill(a)
    assert shared.shape == batch.response_tokens.shape  # each shard kept the batch's width R
    torch.testing.assert_close(shared, alone, atol=1e-6, rtol=0)
    assert (shared[~batch.response_mask] == 0).all()
    assert work == [4, 3]
