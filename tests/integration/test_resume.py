"""Exact resume on a real local Ray, for the settings the command-line test (tests/e2e/test_resume.py)
does not cover: ZeRO-2 and ZeRO-3 on two learner ranks, async mode (the batch generated ahead
is checkpointed), and vLLM rollout. Each: N steps straight against N/2 steps, a stop, and a new
controller that resumes from the checkpoint; the per-step metrics and final weights compare."""

from __future__ import annotations

import json

import pytest
import torch

from integration.configs import demo_config

STEPS = 4
NOT_COMPARED = ("time/", "anatomy/", "step_time", "samples_per_s", "rollout/wait_s", "eval/time_s")


def _run(cfg, run_dir, stop_after: int | None = None, resume: bool = False):
    from keel.controller.checkpoint import CheckpointStore
    from keel.controller.loop import Controller

    resume_from = CheckpointStore(run_dir / "checkpoints", 1).latest() if resume else None
    controller = Controller(cfg, run_dir, log=lambda *_: None, resume_from=resume_from)
    controller.start()

    def stop(m):
        if stop_after is not None and m["step"] + 1 == stop_after:
            controller.request_stop()

    try:
        controller.run(on_step=stop)
        import ray

        weights = ray.get([lr.policy_state.remote() for lr in controller.learners])[0]  # ZeRO-3: a collective
    finally:
        controller.shutdown()
    return weights


def _metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(NOT_COMPARED)} for m in lines]


def _compare(cfg, tmp_path, atol: float = 0.0):
    straight = _run(cfg, tmp_path / "straight")
    _run(cfg, tmp_path / "resumed", stop_after=STEPS // 2)
    assert len(_metrics(tmp_path / "resumed")) == STEPS // 2
    resumed = _run(cfg, tmp_path / "resumed", resume=True)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [m["step"] for m in b] == list(range(STEPS))
    if atol == 0.0:
        assert a == b
    else:
        for ma, mb in zip(a, b, strict=True):
            assert ma.keys() == mb.keys()
            for k in ma:
                assert ma[k] == pytest.approx(mb[k], abs=atol, nan_ok=True), (ma["step"], k)
    worst = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    assert worst <= atol, worst


SMALL = {"controller.steps": STEPS, "controller.prompts_per_step": 16, "algorithm.mini_batch_size": 16}


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_on_two_ranks_resumes_exactly(demo_inputs, ray_session, tmp_path, zero):
    cfg = demo_config(
        *demo_inputs,
        **SMALL,
        **{
            "learner.replicas": 2,
            "learner.micro_batch_size": 8,
            "learner.resources": {"num_cpus": 0.5},
            "learner.deepspeed": {"zero_stage": zero},
        },
    )
    _compare(cfg, tmp_path)


def test_async_resumes_exactly_with_the_batch_generated_ahead(demo_inputs, ray_session, tmp_path):
    """The checkpoint holds the batch made during the last step (weights one version behind), so the
    resumed run trains on the very same samples."""
    cfg = demo_config(
        *demo_inputs,
        **SMALL,
        **{"controller.mode": "async", "controller.max_staleness": 1, "algorithm.off_policy": "tis"},
    )
    _compare(cfg, tmp_path)
    ahead = list((tmp_path / "resumed" / "checkpoints").glob("*/inflight.pt"))
    assert ahead, "the async checkpoint holds no batch generated ahead"
    ids, parts = torch.load(ahead[0], weights_only=False)
    assert len(ids) == 16 and sum(len(p) for p in parts) == 16


def test_vllm_rollout_resumes(demo_inputs, ray_session, tmp_path):
    """vLLM reloads the restored weights in place and samples with per-request seeds."""
    cfg = demo_config(*demo_inputs, **SMALL, **{"rollout.backend": "vllm"})
    _compare(cfg, tmp_path)
