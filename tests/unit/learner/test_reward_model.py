"""keel rm's trainer: better than chance on held-out pairs, and its output is a reward model the
reward role and `keel serve reward` load."""

from __future__ import annotations

import pytest

from keel.config import RewardConfig, RewardModelConfig, RewardModelSource
from keel.learner.offline import run_offline
from keel.learner.reward_model import RewardModelTrainer
from unit.learner.offline_helpers import pair_data, trainer


def test_reward_model_ranks_held_out_pairs_and_loads_as_the_reward(demo_inputs, tmp_path):
    policy, _ = demo_inputs
    train, held = pair_data(tmp_path)
    cfg = RewardModelConfig.model_validate(
        {
            "model": {"path": str(policy)},
            "data": {"path": str(train), "eval_path": str(held), "margin_field": "margin", "max_tokens": 16},
            "use_margin": True,
            "trainer": trainer(micro=32, lr=1e-3),
            "train": {"epochs": 4, "batch_size": 32, "eval_every": 25},
        }
    )
    history, _ = run_offline(RewardModelTrainer, cfg, tmp_path / "rm")
    held_acc = [m["eval/rm/accuracy"] for m in history if "eval/rm/accuracy" in m]
    losses = [m["rm/loss"] for m in history if "rm/loss" in m]
    print("held-out accuracy", held_acc)
    assert held_acc[-1] > 0.7, held_acc  # chance is 0.5
    assert sum(losses[-5:]) < sum(losses[:5]), losses

    from keel.reward.model import RewardModel

    reward = RewardModel(RewardConfig(source=RewardModelSource(path=str(tmp_path / "rm"))))
    scores = reward.score(["3+4=", "3+4="], ["7", "cat"]).tolist()
    assert scores[0] > scores[1]  # a junk answer is the easiest thing to rank below the sum


def test_margin_needs_its_field():
    from keel.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"path": "m"}, "data": {"path": "d"}, "use_margin": True}, "rm.yaml", RewardModelConfig)
    assert info.value.lines == ["data.margin_field: use_margin is on: name the field that holds each pair's margin"]
