"""The controller on a real local Ray: several rollout workers and learner ranks, and placement
errors that say what is wrong instead of hanging."""

from __future__ import annotations

import time

import pytest
import torch

from integration.configs import demo_config

_config = demo_config


def test_two_rollout_workers_and_two_learner_ranks(demo_inputs, ray_session, tmp_path):
    from keel.controller.loop import Controller

    cfg = _config(
        *demo_inputs,
        **{
            "rollout.replicas": 2,
            "rollout.resources": {"num_cpus": 0.25},
            "learner.replicas": 2,
            "learner.resources": {"num_cpus": 0.5},
            "controller.steps": 3,
        },
    )
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    controller.start()
    try:
        seen_workers = []
        for _ in range(3):
            import ray

            before = controller.version
            metrics = controller.step()
            assert metrics["weight_version"] == before
            versions = ray.get([w.ready.remote() for w in controller.rollout])
            assert [v["weight_version"] for v in versions] == [before + 1, before + 1]
            seen_workers.append(metrics)
        # both ranks hold the same weights after data-parallel updates
        states = ray.get([lr.policy_state.remote() for lr in controller.learners])
        for name in states[0]:
            assert (states[0][name] - states[1][name]).abs().max().item() < 1e-6, name
    finally:
        controller.shutdown()
    assert all(m["reward_mean"] == m["reward_mean"] for m in seen_workers)


def test_unplaceable_role_fails_fast_with_what_it_asked(demo_inputs, ray_session, tmp_path):
    from keel.controller.loop import Controller
    from keel.controller.placement import PlacementError

    cfg = _config(*demo_inputs, **{"learner.resources": {"num_cpus": 1, "custom": {"learner_node": 1}}})
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    t0 = time.perf_counter()
    with pytest.raises(PlacementError, match=r"cannot place role 'learner'.*learner_node 1.*only learner_node 0"):
        controller.start()
    assert time.perf_counter() - t0 < 30
    controller.shutdown()


def test_grpc_channels_change_nothing(demo_inputs, ray_session, tmp_path, monkeypatch):
    """The same seed with every channel over the object store, then over gRPC (token on, the reward
    from an external shared server as `keel serve reward` runs it): the same samples, scores, KL
    and updates, step by step, and the same weights at the end."""
    import ray

    from keel.config import GrpcConfig
    from keel.controller.loop import Controller
    from keel.reward.server import RewardServerConfig, start_reward_server

    monkeypatch.setenv("KEEL_GRPC_TOKEN", "same-token")
    base = _config(*demo_inputs)
    shared = start_reward_server(RewardServerConfig(reward=base.reward, grpc=GrpcConfig(), port=0))
    runs = {}
    try:
        for transport in ("objectstore", "grpc"):
            channels = {f"transport.{c}": transport for c in ("trajectories", "weights", "reward")}
            if transport == "grpc":
                channels["transport.grpc.reward_address"] = f"127.0.0.1:{shared.port}"
            cfg = _config(*demo_inputs, **channels, **{"rollout.resources": {"num_cpus": 0.25}})
            controller = Controller(cfg, tmp_path / transport, log=lambda *_: None)
            controller.start()
            try:
                history = [controller.step() for _ in range(3)]
                state = ray.get(controller.learners[0].policy_state.remote())
                worker = ray.get(controller.rollout[0].ready.remote())
                addresses = dict(controller.channels.addresses)
                # no reward actor: the server scores
                assert (controller.supervisor.reward is None) == (transport == "grpc")
            finally:
                controller.shutdown()
            runs[transport] = history, state, worker
    finally:
        shared.stop(0)
    assert addresses["reward"] == f"127.0.0.1:{shared.port}" and shared.batcher.batches >= 3
    (h_obj, s_obj, w_obj), (h_grpc, s_grpc, w_grpc) = runs["objectstore"], runs["grpc"]
    for key in ("reward_mean", "kl", "response_length", "policy/loss", "value/loss", "rollout/logprob_gap_mean"):
        assert [m[key] for m in h_obj] == [m[key] for m in h_grpc], key
    assert all(torch.equal(s_obj[k], s_grpc[k]) for k in s_obj)
    assert w_obj["weight_version"] == w_grpc["weight_version"] == 3
    # the same bytes, mapped from the learner's shared memory or streamed over gRPC
    assert h_grpc[0]["weight_sync/bytes"] == h_obj[0]["weight_sync/bytes"] > 0
