"""keel eval on real models: the reference against itself ties and has no KL; another policy is
scored for reward, task metric, KL and wins/ties/losses judged by a reward model."""

from __future__ import annotations

import io
import json

import pytest
import torch

from keel.config import EvalConfig
from keel.evaluation import evaluate, win_tie_loss, write_eval
from keel.telemetry.console import Console


def test_win_tie_loss_counts():
    scores, base = torch.tensor([1.0, 0.5, 0.5, 2.0]), torch.tensor([0.0, 0.5, 1.0, 2.0 + 1e-9])
    assert win_tie_loss(scores, base) == (1, 2, 1)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from keel.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("judge") / "rm", reward=True)


def _perturbed_copy(src, dst):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(0)
    state = {
        k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in load_file(str(src / "model.safetensors")).items()
    }
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_eval_of_two_checkpoints(demo_inputs, judge, tmp_path):
    policy, prompts = demo_inputs
    other = _perturbed_copy(policy, tmp_path / "other")
    cfg = EvalConfig.model_validate(
        {
            "checkpoints": [{"name": "same", "path": str(policy)}, {"name": "other", "path": str(other)}],
            "reference": str(policy),
            "data": {"prompts": str(prompts), "metadata_fields": ["answer"]},
            "max_prompt_tokens": 16,
            "sampling": {"temperature": 1.0, "max_new_tokens": 4, "n": 2},
            "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
            "judge": str(judge),
            "task_metric": "keel.reward.rules:arithmetic_exact",
            "max_prompts": 40,
        }
    )
    lines, shown = [], io.StringIO()
    result = evaluate(cfg, log=lines.append, progress=Console("plain", shown))
    ends = [line.split(":")[0] for line in shown.getvalue().splitlines() if " done in " in line]
    assert ends == [
        "tokenize prompts",
        "load the reference, reward and judge",
        "judge the reference's answers",
        "evaluate checkpoints",
    ]
    assert "evaluate checkpoints: 2/2 done in" in shown.getvalue()
    same, moved = result["checkpoints"]
    assert result["prompts"] == 40 and same["samples"] == moved["samples"] == 80
    # the reference judged against itself: same samples (same seed), so every pair ties and KL is 0
    assert same["kl"] == pytest.approx(0.0, abs=1e-4)
    assert (same["wins"], same["ties"], same["losses"], same["win_rate"]) == (0, 80, 0, 0.5)
    assert moved["kl"] > 0.05
    assert moved["wins"] + moved["ties"] + moved["losses"] == 80 and moved["ties"] < 80
    assert moved["win_rate"] == pytest.approx((moved["wins"] + 0.5 * moved["ties"]) / 80)
    for row in (same, moved):
        assert 0.0 <= row["task_metric"] <= 1.0 and 0.0 <= row["reward_mean"] <= 1.0
        assert 0 < row["response_length"] <= 4 and len(row["examples"]) == 5
    assert lines[0].startswith("same:  task ") and "w/t/l" in lines[1] and len(lines) == 2  # no best-of-n table
    assert "best_of_n" not in result and not any(key.startswith("bon@") for key in same)
    path = write_eval(result, tmp_path / "eval.json")
    assert json.loads(path.read_text())["checkpoints"][1]["name"] == "other"


def test_eval_best_of_n_curve_from_the_same_samples(demo_inputs, tmp_path):
    """best_of_n 8 on the demo task: the reward picks (partial credit for any number), the task metric
    (exact sum) measures the pick, and the best of 8 is right far more often than one sample."""
    policy, prompts = demo_inputs
    cfg = EvalConfig.model_validate(
        {
            "checkpoints": [{"name": "base", "path": str(policy)}],
            "reference": str(policy),
            "data": {"prompts": str(prompts), "metadata_fields": ["answer"]},
            "max_prompt_tokens": 16,
            "sampling": {"temperature": 1.0, "max_new_tokens": 4},
            "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
            "task_metric": "keel.reward.rules:arithmetic_exact",
            "max_prompts": 256,
            "best_of_n": 8,
        }
    )
    lines: list[str] = []
    result = evaluate(cfg, log=lines.append)
    [row] = result["checkpoints"]
    assert result["best_of_n"] == 8 and row["samples"] == 256 * 8
    ks = [1, 2, 4, 8]
    for measure in ("reward", "reward_unbiased", "task_metric", "task_metric_unbiased"):
        assert [f"bon@{k}/{measure}" in row for k in ks] == [True] * 4
    for measure in ("reward", "reward_unbiased"):  # the best of more samples never scores less
        curve = [row[f"bon@{k}/{measure}"] for k in ks]
        assert curve == sorted(curve), (measure, curve)
    # k = 1 over every sample is the plain mean
    assert row["bon@1/task_metric_unbiased"] == pytest.approx(row["task_metric"])
    assert row["bon@1/reward_unbiased"] == pytest.approx(row["reward_mean"])
    # the base model is right about 1 time in 100: in 256 prompts, some 3 first samples, some 18 best of 8
    assert row["bon@8/task_metric"] > row["bon@1/task_metric"]
    assert row["bon@8/task_metric_unbiased"] > 2 * row["bon@1/task_metric_unbiased"] > 0
    assert lines[1].split()[:6] == ["best", "of", "k", "k=1", "k=2", "k=4"] and len(lines) == 6
