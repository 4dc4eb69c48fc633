"""A step's anatomy: each role's busy and idle share of the step."""

from __future__ import annotations

import pytest

from keel.controller.loop import step_anatomy


def test_shares_follow_the_phases_and_the_roles_calls():
    phases = {"rollout": 2.0, "score": 1.0, "advantages": 0.1, "update": 3.9, "weight_sync": 0.2}  # 7.2 s
    busy = {"rollout": 2.0, "old_logprobs": 0.9, "reward": 0.4, "reference": 0.8}
    a = step_anatomy(phases, busy)
    assert a["anatomy/rollout_busy"] == pytest.approx(2.0 / 7.2)
    assert a["anatomy/learner_busy"] == pytest.approx((0.9 + 3.9 + 0.2) / 7.2)
    assert a["anatomy/reward_busy"] == pytest.approx(0.4 / 7.2)
    assert a["anatomy/controller_busy"] == pytest.approx(0.1 / 7.2)
    for role in ("rollout", "reward", "reference", "learner", "controller"):
        assert a[f"anatomy/{role}_busy"] + a[f"anatomy/{role}_idle"] == pytest.approx(1.0)
    assert a["time/old_logprobs"] == 0.9


def test_an_async_rollout_longer_than_the_step_counts_as_busy_all_step():
    phases = {"rollout": 0.0, "score": 1.0, "advantages": 0.0, "update": 2.0, "weight_sync": 0.0}
    a = step_anatomy(phases, {"rollout": 5.0, "old_logprobs": 0.0, "reward": 0.0, "reference": 0.0})
    assert a["anatomy/rollout_busy"] == 1.0 and a["anatomy/rollout_idle"] == 0.0
