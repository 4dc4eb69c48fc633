"""The autoscaling rule and the off-policy ratio of async mode: plain functions."""

from __future__ import annotations

import torch

from keel.config import AutoscaleConfig
from keel.controller.scaling import Autoscaler


def test_autoscaler_adds_after_patience_and_removes_when_idle_within_bounds():
    scaler = Autoscaler(AutoscaleConfig(enabled=True, min_replicas=1, max_replicas=3, target_wait_s=1.0, patience=2))
    n, seen = 1, []
    for wait in [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]:
        n = scaler.decide(n, wait)
        seen.append(n)
    # two slow steps add one; capped at 3; 0.5 s is inside the band; two fast ones remove one, down to 1
    assert seen == [1, 2, 2, 3, 3, 3, 3, 3, 2, 2, 1, 1, 1]
    # a slow step between fast ones resets the count
    scaler = Autoscaler(AutoscaleConfig(enabled=True, max_replicas=4, target_wait_s=1.0, patience=2))
    assert [scaler.decide(2, w) for w in (0.1, 2.0, 0.1, 0.1)] == [2, 2, 2, 1]


def test_off_policy_ratio_against_the_sampler_or_with_truncated_weights(demo_inputs):
    from integration.configs import demo_config
    from keel.controller.loop import off_policy
    from keel.trajectory import Trajectories

    mask = torch.tensor([[True, True, False]])
    traj = Trajectories(
        rollout_id="r",
        weight_version=0,
        prompt_ids=["p"],
        sample_index=[0],
        prompt_tokens=torch.ones(1, 2, dtype=torch.long),
        prompt_mask=torch.ones(1, 2, dtype=torch.bool),
        response_tokens=torch.ones(1, 3, dtype=torch.long),
        response_mask=mask,
        behaviour_logprobs=torch.tensor([[-1.0, -2.0, 0.0]]),
        prompts=["x"],
        responses=["y"],
        old_logprobs=torch.tensor([[-0.5, -3.0, 0.0]]),
    )
    behaviour = off_policy(traj, demo_config(*demo_inputs, **{"algorithm.off_policy": "behaviour"}))
    assert torch.equal(behaviour.old_logprobs, traj.behaviour_logprobs) and behaviour.is_weights is None
    tis = off_policy(traj, demo_config(*demo_inputs, **{"algorithm.off_policy": "tis", "algorithm.tis_cap": 1.5}))
    assert torch.equal(tis.old_logprobs, traj.old_logprobs)
    # w = min(exp(old - behaviour), cap): exp(0.5) = 1.65 -> 1.5, exp(-1) = 0.37; 0 on padding
    assert torch.allclose(tis.is_weights, torch.tensor([[1.5, 0.3679, 0.0]]), atol=1e-4)
