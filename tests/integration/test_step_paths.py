"""The fast paths of a step on a real Ray run with a vLLM rollout: a one-pass GRPO update (no
log-prob pass before it), mixed precision (a bfloat16 vLLM engine fed bfloat16 weights, autocast
learner and reference), and in sync mode every role's threads on all of the node's cores."""

from __future__ import annotations

from integration.configs import demo_config


def _threads(actor) -> int:
    import ray

    def probe(_self) -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(actor.__ray_call__.remote(probe), timeout=60)


def test_one_pass_mixed_precision_grpo_on_vllm(demo_inputs, ray_session, tmp_path):
    import ray

    from keel.controller.loop import Controller

    cfg = demo_config(
        *demo_inputs,
        **{
            "model.precision": "mixed",
            "rollout.backend": "vllm",
            "rollout.sampling.n": 4,
            "controller.prompts_per_step": 8,
            "controller.steps": 3,
            "algorithm.estimator": "grpo",
            "algorithm.ppo_epochs": 1,
            "algorithm.mini_batch_size": 32,
            "algorithm.kl": {"coef": 0.05, "estimator": "k3", "placement": "loss"},
            "learner.micro_batch_size": 16,
        },
    )
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    controller.start()
    try:
        assert controller.one_pass
        roles = [controller.learners[0], controller.rollout[0], controller.supervisor.reference.actors[0]]
        assert [_threads(a) for a in roles] == [2, 2, 2]  # sync: each phase has both cores while it runs
        history = controller.run()
        served = ray.get(
            controller.rollout[0].__ray_call__.remote(lambda w: str(w.generator.llm.llm_engine.model_config.dtype))
        )
    finally:
        controller.shutdown()
    steps = [m for m in history if "step_time" in m]
    assert len(steps) == 3 and served == "torch.bfloat16"
    # the update's own forward pass stood in for the log-prob pass: pi_old is what vLLM sampled, up to
    # bfloat16 rounding, and the policy starts at the reference (same weights, same precision)
    assert all(m["rollout/logprob_gap_mean"] < 0.05 for m in steps), [m["rollout/logprob_gap_mean"] for m in steps]
    assert steps[0]["kl"] < 1e-3, steps[0]["kl"]
    assert all(m["policy/ratio_max"] == 1.0 for m in steps)  # one pass: pi_old is the update's own forward
    assert [m["weight_version"] for m in steps] == [0, 1, 2]
    for m in steps:  # the step's anatomy: the learner ran no log-prob pass, and the roles took turns
        assert m["time/old_logprobs"] < 0.05, m["time/old_logprobs"]
        busy = {r: m[f"anatomy/{r}_busy"] for r in ("rollout", "reward", "reference", "learner", "controller")}
        assert all(0 <= b <= 1 and b + m[f"anatomy/{r}_idle"] == 1 for r, b in busy.items()), busy
        assert busy["rollout"] > 0 and busy["learner"] > 0 and sum(busy.values()) < 1.2, busy
