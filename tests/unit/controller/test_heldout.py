"""Held-out evaluation during `keel train`: when it runs, what it measures, and a bad held-out
file stopping the run before anything is placed."""

import pytest
import torch

from keel.config import parse_config
from keel.controller.advantages import sequence_kl
from keel.controller.heldout import HeldOut, format_eval
from keel.trajectory import Trajectories


def _cfg(policy="p", steps=5, data=None, **logging):
    held_out = {"prompts": "prompts.jsonl", "eval_prompts": "eval.jsonl", "metadata_fields": ["answer"]}
    return parse_config(
        {
            "model": {"policy": str(policy)},
            "data": {**held_out, **(data or {})},
            "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
            "controller": {"steps": steps, "prompts_per_step": 4},
            "rollout": {"sampling": {"n": 4, "temperature": 0.7}},
            "algorithm": {"estimator": "grpo", "mini_batch_size": 16},
            "logging": logging,
        }
    )


@pytest.mark.parametrize(
    "every, steps, due",
    [(2, 5, [2, 4, 5]), (0, 5, [5]), (3, 3, [3]), (1, 3, [1, 2, 3])],
)
def test_evaluates_every_eval_every_steps_and_after_the_last(every, steps, due):
    held = HeldOut.from_config(_cfg(eval_every=every, steps=steps), prompts=[])
    assert [k for k in range(steps + 1) if held.due(k)] == due


def test_one_sample_per_prompt_sampled_as_configured():
    held = HeldOut.from_config(_cfg(), prompts=[])
    assert held.sampling.n == 1 and held.sampling.temperature == 0.7


def _scored(R=4):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    B = len(mask)
    old = -torch.rand(B, R) * mask
    return Trajectories(
        rollout_id="r",
        weight_version=3,
        prompt_ids=["0", "1", "2"],
        sample_index=[0] * B,
        prompt_tokens=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_tokens=torch.ones(B, R, dtype=torch.long),
        response_mask=mask,
        behaviour_logprobs=old,
        prompts=["1+1=", "2+2=", "3+3="],
        responses=["2", "5", "6 "],
        metadata=[{"answer": "2"}, {"answer": "4"}, {"answer": "6"}],
        scores=torch.tensor([1.0, 0.1, 1.0]),
        old_logprobs=old,
        ref_logprobs=-torch.rand(B, R) * mask,
    )


def test_metrics_are_the_training_kl_reward_length_and_task_metric():
    cfg = _cfg(data={"eval_task_metric": "keel.reward.rules:arithmetic_exact"})
    traj = _scored()
    m = HeldOut.from_config(cfg, prompts=[]).metrics(traj)
    assert m["eval/kl"] == sequence_kl(traj, "k1")  # the training metric `kl`, on these samples
    assert m["eval/reward_mean"] == pytest.approx(2.1 / 3)
    assert m["eval/response_length"] == pytest.approx(3.0)
    assert m["eval/task_metric"] == pytest.approx(2 / 3)  # "2" and "6 " (stripped) are right, "5" is not
    assert "eval/kl" not in HeldOut.from_config(cfg, []).metrics(traj.with_fields(ref_logprobs=None))
    assert "task 0.667" in format_eval({"step": 3, **m, "eval/time_s": 0.5})


def test_a_bad_held_out_file_stops_the_run_before_anything_is_placed(tiny_model_dir, tmp_path, monkeypatch):
    from keel.controller import loop, supervisor
    from keel.data.rows import DataError
    from keel.data.tasks import arithmetic_rows, write_jsonl

    def place_roles(*_):
        raise AssertionError("roles were placed")

    monkeypatch.setattr(supervisor, "place_roles", place_roles)
    prompts = write_jsonl(arithmetic_rows(16), tmp_path / "prompts.jsonl")
    held_out = write_jsonl([{"prompt": "1+1="}], tmp_path / "eval.jsonl")  # no answer for the reward
    cfg = _cfg(tiny_model_dir, data={"prompts": str(prompts), "eval_prompts": str(held_out)})
    controller = loop.Controller(cfg, tmp_path / "run", log=lambda *_: None)
    with pytest.raises(DataError, match=r"eval.jsonl.*1.*missing metadata field 'answer'"):
        controller.start()
    controller.sinks.close()
    assert controller.supervisor.groups == {} and controller.supervisor.reward is None
