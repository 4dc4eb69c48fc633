"""A rollout worker outside Ray, talking to the learner side only over gRPC on 127.0.0.1 with a
bearer token: it pulls weights from a WeightService and pushes trajectories to a
TrajectoryService; evicted versions, stale batches and damaged weights change nothing."""

from __future__ import annotations

import pytest
import torch

from keel.config import GrpcConfig, ModelConfig, RolloutConfig, SamplingConfig
from keel.data.prompts import Prompt
from keel.rollout.worker import RolloutWorker
from keel.transport.trajectories import TrajectoryInbox, TrajectoryPushError, TrajectoryRejected, TrajectoryServer
from keel.transport.weights import WeightFetchError, WeightPublisher

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=6, n=1)


@pytest.fixture
def plane(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("KEEL_GRPC_TOKEN", "plane-token")
    cfg = GrpcConfig(weight_versions_kept=2, weight_chunk_mb=0.25, deadline_s=20, retries=2)
    publisher = WeightPublisher(cfg)
    trajectories = TrajectoryServer(TrajectoryInbox(max_staleness=1), cfg)
    worker = RolloutWorker(ModelConfig(policy=str(tiny_model_dir)), RolloutConfig(backend="hf"), 64, seed=0)
    worker.connect(cfg, weights=publisher.address, trajectories=trajectories.address)
    yield publisher, trajectories, worker
    publisher.stop(0)
    trajectories.stop(0)


def _prompts(worker, texts):
    return [Prompt(f"q{i}", t, tuple(worker.tokenizer(t).input_ids), {}) for i, t in enumerate(texts)]


def _perturbed(worker, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in worker.generator.model.state_dict().items()}


def test_worker_pulls_versions_over_grpc_and_refuses_evicted_ones(plane):
    publisher, _, worker = plane
    original = {k: v.clone() for k, v in worker.generator.model.state_dict().items()}
    states = {v: _perturbed(worker, v) for v in (1, 2, 3)}
    for v, state in states.items():
        publisher.publish(v, state)  # keeps the last 2: version 1 is evicted

    with pytest.raises(WeightFetchError, match=r"NOT_FOUND.*held: \[2, 3\]"):
        worker.pull_weights(1)
    assert worker.weight_version == 0
    assert all(torch.equal(original[k], v) for k, v in worker.generator.model.state_dict().items())

    assert worker.pull_weights(2) == 2
    assert all(torch.equal(states[2][k], v) for k, v in worker.generator.model.state_dict().items())
    assert worker.pull_weights(0) == 3  # 0 = the latest
    assert all(torch.equal(states[3][k], v) for k, v in worker.generator.model.state_dict().items())


def test_worker_pushes_trajectories_and_stale_ones_are_refused(plane):
    publisher, trajectories, worker = plane
    prompts = _prompts(worker, ["1+2=", "3+4=", "hello"])
    rollout_id = worker.generate_and_push(prompts, seed=0, sampling=GREEDY)
    [batch] = trajectories.inbox.take([rollout_id], timeout_s=5)
    local = worker.generate(prompts, seed=0, sampling=GREEDY)  # greedy: the same tokens again
    assert batch.weight_version == 0 and batch.prompt_ids == ["q0", "q1", "q2"]
    assert torch.equal(batch.response_tokens, local.response_tokens)
    assert torch.equal(batch.response_mask, local.response_mask)
    assert torch.allclose(batch.behaviour_logprobs, local.behaviour_logprobs)
    assert batch.responses == local.responses

    # the learner moves to version 2 with max_staleness 1: a version-0 batch is too old
    trajectories.inbox.set_version(2)
    with pytest.raises(TrajectoryRejected, match=r"refused: stale: version 0 < 2 - 1"):
        worker.generate_and_push(prompts, seed=0, sampling=GREEDY)
    assert len(trajectories.inbox) == 0 and trajectories.inbox.stats.stale == 1
    # after pulling the current weights the worker's batches are accepted again
    publisher.publish(2, _perturbed(worker, 2))
    worker.pull_weights(2)
    rollout_id = worker.generate_and_push(prompts, seed=0, sampling=GREEDY)
    assert trajectories.inbox.take([rollout_id], timeout_s=5)[0].weight_version == 2


def test_a_worker_with_the_wrong_token_gets_nothing(plane, tiny_model_dir, monkeypatch):
    publisher, trajectories, _ = plane
    publisher.publish(1, _perturbed(plane[2], 1))
    monkeypatch.setenv("KEEL_GRPC_TOKEN", "not-the-token")
    intruder = RolloutWorker(ModelConfig(policy=str(tiny_model_dir)), RolloutConfig(backend="hf"), 64, seed=0)
    intruder.connect(GrpcConfig(retries=0), weights=publisher.address, trajectories=trajectories.address)
    with pytest.raises(WeightFetchError, match="UNAUTHENTICATED"):
        intruder.pull_weights(1)
    assert intruder.weight_version == 0
    with pytest.raises(TrajectoryPushError, match=r"trajectory service .*: UNAUTHENTICATED: missing or wrong bearer"):
        intruder.generate_and_push(_prompts(intruder, ["1+1="]), seed=0, sampling=GREEDY)
    assert len(trajectories.inbox) == 0


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s, k: s.pop(k), r"missing"),
        (lambda s, k: s.__setitem__(k, s[k][:-1]), r"is \(450, 128\) of torch.float32, expected \(451, 128\)"),
        (lambda s, k: s.__setitem__(k, s[k].half()), r"of torch.float16, expected \(451, 128\) of torch.float32"),
    ],
    ids=["missing", "shape", "dtype"],
)
def test_a_manifest_unlike_the_workers_model_is_refused_before_any_fetch(plane, damage, message):
    """The worker checks the published manifest against its own model (names, shapes, dtypes)
    before it allocates anything; the old weights keep serving."""
    publisher, _, worker = plane
    before = {k: v.clone() for k, v in worker.generator.model.state_dict().items()}
    state = _perturbed(worker, 3)
    damage(state, "model.embed_tokens.weight")
    publisher.publish(1, state)
    with pytest.raises(WeightFetchError, match=message):
        worker.pull_weights(1)
    assert worker.weight_version == 0
    assert all(torch.equal(v, before[k]) for k, v in worker.generator.model.state_dict().items())
