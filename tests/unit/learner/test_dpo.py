"""keel dpo's trainer: reference log-probs computed once, the loss falls, every loss type trains."""

from __future__ import annotations

import pytest
import torch

from keel.config import DPOConfig
from keel.learner.dpo import DPOTrainer
from keel.learner.offline import run_offline
from unit.learner.offline_helpers import pair_data, trainer


def _cfg(policy, train, held, **dpo):
    return DPOConfig.model_validate(
        {
            "model": {"path": str(policy)},
            "data": {"path": str(train), "eval_path": str(held), "max_tokens": 16},
            "trainer": trainer(micro=32, lr=5e-4),
            "train": {"epochs": 1, "batch_size": 32, "max_steps": 12, "eval_every": 6},
            "dpo": dpo,
        }
    )


def test_reference_logprobs_are_computed_once_and_match_the_reference(demo_inputs, tmp_path):
    from keel.models.loading import load_causal_lm, response_logprobs

    policy, _ = demo_inputs
    train, held = pair_data(tmp_path, rows=64, held_out=32)
    t = DPOTrainer(_cfg(policy, train, held))
    assert not hasattr(t, "_reference")  # scored, then freed before the policy was built
    ref = load_causal_lm(str(policy)).eval()
    for item in t.train_items[:4]:
        pair = item.pair
        ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
        lp = response_logprobs(ref, ids, torch.ones_like(ids), len(pair.prompt_ids))
        assert item.ref_chosen == pytest.approx(lp.sum().item(), abs=1e-4)


@pytest.mark.parametrize("dpo", [{"loss_type": "sigmoid"}, {"loss_type": "ipo"}, {"label_smoothing": 0.1}], ids=str)
def test_dpo_loss_falls_and_pairs_separate(demo_inputs, tmp_path, dpo):
    policy, _ = demo_inputs
    train, held = pair_data(tmp_path, rows=384, held_out=64)
    history, _ = run_offline(DPOTrainer, _cfg(policy, train, held, **dpo), tmp_path / "dpo")
    steps = [m for m in history if "dpo/loss" in m]
    evals = [m for m in history if "eval/dpo/accuracy" in m]
    assert steps[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-3)  # policy == reference at the start
    assert steps[-1]["dpo/loss"] < steps[0]["dpo/loss"], [m["dpo/loss"] for m in steps]
    assert evals[-1]["eval/dpo/accuracy"] > 0.6 and evals[-1]["eval/dpo/margin"] > 0

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")
