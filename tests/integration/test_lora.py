"""model.lora on a real local Ray with an HF rollout: no reference actor (the policy with its adapter
off, on two learner ranks, is the reference), the rollout serves exactly the learner's merged policy
after the adapter-only syncs (shared memory), and with the adapters over the WeightService a stopped
run resumes exactly (adapters and their optimizer state)."""

from __future__ import annotations

import torch

from integration.configs import demo_config
from integration.test_resume import SMALL, _compare

LORA = {
    "model.lora": {"rank": 4, "alpha": 8},
    "algorithm.estimator": "grpo",
    "rollout.sampling.n": 4,
    "learner.optimizer": {"lr": 2.0e-3},
}


def test_the_rollout_serves_the_learners_merged_policy(demo_inputs, ray_session, tmp_path):
    import ray

    from keel.controller.loop import Controller
    from keel.models.loading import load_causal_lm

    two_ranks = {"learner.replicas": 2, "learner.micro_batch_size": 8, "learner.resources": {"num_cpus": 0.5}}
    cfg = demo_config(*demo_inputs, **{**SMALL, **LORA, **two_ranks, "controller.steps": 2})
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    controller.start()
    try:
        assert "reference" not in controller.supervisor.groups and controller.supervisor.reference.actors == []
        history = controller.run()
        merged = ray.get(controller.learners[0].policy_state.remote())
        served = ray.get(controller.rollout[0].__ray_call__.remote(lambda w: w.generator.model.state_dict()))
    finally:
        controller.shutdown()
    # KL in the reward, to the adapter-off policy; exactly 0 at step 0 (each rank's share, joined in rank order)
    assert history[0]["kl"] == 0.0 and history[1]["kl"] != 0.0
    assert all(m["weight_sync/bytes"] == 2 * 4 * (4 * 128 + 128 * 4) * 4 + 4 for m in history)
    assert set(served) == set(merged) and all(torch.equal(served[k], merged[k]) for k in merged)
    base = load_causal_lm(str(demo_inputs[0])).state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapters trained


def test_lora_with_adapters_over_grpc_resumes_exactly(demo_inputs, ray_session, tmp_path):
    cfg = demo_config(*demo_inputs, **SMALL, **LORA, **{"transport.weights": "grpc", "transport.grpc.auth": False})
    _compare(cfg, tmp_path)
