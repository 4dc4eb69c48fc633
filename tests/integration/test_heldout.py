"""`keel train`'s held-out evaluation on a real local Ray, with two reward servers (gRPC) and two
reference actors sharing each batch: eval lines at the right steps, with finite values."""

from __future__ import annotations

import io
import json
import math

import pytest

from integration.configs import demo_config
from unit.telemetry.trackers import tensorboard_scalars


def test_a_run_evaluates_held_out_prompts_every_eval_every_steps(tiny_model_dir, ray_session, tmp_path):
    import ray

    from keel.controller.loop import Controller
    from keel.data.tasks import arithmetic_rows, write_jsonl

    prompts = write_jsonl(arithmetic_rows(32), tmp_path / "prompts.jsonl")
    held_out = write_jsonl(arithmetic_rows(8, seed=99), tmp_path / "eval.jsonl")
    cfg = demo_config(
        tiny_model_dir,
        prompts,
        **{
            "data.eval_prompts": str(held_out),
            "data.eval_task_metric": "keel.reward.rules:arithmetic_exact",
            "logging.eval_every": 2,
            "controller.steps": 3,
            "controller.prompts_per_step": 8,
            "algorithm.mini_batch_size": 8,
            "algorithm.ppo_epochs": 1,
            "learner.micro_batch_size": 8,
            "learner.resources": {"num_cpus": 0.5},
            "rollout.resources": {"num_cpus": 0.25},
            "reward.replicas": 2,
            "reference.replicas": 2,
            "transport.reward": "grpc",
            "transport.grpc.auth": False,
        },
    )
    from keel.telemetry.console import Console

    shown = io.StringIO()
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None, progress=Console("plain", shown))
    controller.start()
    try:
        history = controller.run()
        rewards = ray.get([a.samples_scored.remote() for a in controller.supervisor.reward.actors])
        references = ray.get([a.samples_scored.remote() for a in controller.supervisor.reference.actors])
    finally:
        controller.shutdown()

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "reward_mean" in m] == [0, 1, 2]
    evals = [m for m in lines if "eval/reward_mean" in m]
    assert evals == [m for m in history if "eval/reward_mean" in m]  # the controller's history has them too
    assert [(m["step"], m["weight_version"]) for m in evals] == [(2, 2), (3, 3)]  # after steps 2 and 3 (the last)
    for m in evals:
        assert m["eval/samples"] == 8
        for key in ("eval/reward_mean", "eval/kl", "eval/response_length", "eval/task_metric"):
            assert math.isfinite(m[key]), (key, m)
        assert 0.0 <= m["eval/task_metric"] <= 1.0 and 0 < m["eval/response_length"] <= 4
    # 3 training batches of 8 and 2 held-out batches of 8, each split 4 + 4 between two actors
    assert rewards == [20, 20] and references == [20, 20]
    # the trackers (TensorBoard by default) hold the step and evaluation metrics at the steps of metrics.jsonl
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["reward_mean"]] == [0, 1, 2] and [s for s, _ in scalars["eval/kl"]] == [2, 3]
    trained = [m["time/update"] for m in lines if "reward_mean" in m]
    assert [v for _, v in scalars["time/update"]] == pytest.approx(trained, rel=1e-6)  # float32 in the event file
    # the long operations reported their progress (on a non-terminal: a line as each starts and ends)
    ends = [line.split(":")[0] for line in shown.getvalue().splitlines() if "done in" in line]
    evaluations = ["held-out evaluation (8 prompts)"] * 2
    started = ["tokenize prompts", "tokenize held-out prompts", "start roles, load models"]
    assert ends == started + evaluations, shown.getvalue()
