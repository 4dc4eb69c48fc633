import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.algo.ppo import entropy_loss, explained_variance, policy_loss, value_loss
from unit.algo.strategies import assert_values, masked_batch


def slow_policy_loss(lp, old, adv, mask, lo, hi, dual):
    """Per-token loop over the PPO objective, token-mean aggregation."""
    total, count = 0.0, 0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[b, t] == 0:
                continue
            ratio = math.exp(lp[b, t] - old[b, t])
            a = adv[b, t].item()
            loss = max(-a * ratio, -a * min(max(ratio, 1 - lo), 1 + hi))
            if dual is not None and a < 0:
                loss = min(loss, -dual * a)
            total += loss
            count += 1
    return total / max(count, 1)


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    loss, metrics = policy_loss(lp, lp.clone(), adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-2.0 / 3)
    assert metrics["policy/clip_frac"] == 0.0
    assert metrics["policy/approx_kl"] == pytest.approx(0.0)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0)


def test_clipping_hand_case_asymmetric():
    old = torch.zeros(1, 2)
    lp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    m = torch.ones(1, 2)
    # symmetric 0.2: token0 -> max(-1.5, -1.2) = -1.2 ; token1 -> max(0.5, 0.8) = 0.8
    loss, metrics = policy_loss(lp, old, adv, m, clip_low=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert metrics["policy/clip_frac"] == pytest.approx(1.0)
    # clip_high 0.6 lets token0 through unclipped: max(-1.5, -1.5) = -1.5
    loss, metrics = policy_loss(lp, old, adv, m, clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx((-1.5 + 0.8) / 2)
    assert metrics["policy/clip_frac"] == pytest.approx(0.5)


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 1)
    lp = torch.log(torch.tensor([[10.0]]))  # ratio 10 on a bad action
    adv = torch.tensor([[-1.0]])
    plain, _ = policy_loss(lp, old, adv, torch.ones(1, 1))
    dual, metrics = policy_loss(lp, old, adv, torch.ones(1, 1), dual_clip=3.0)
    assert plain.item() == pytest.approx(10.0)
    assert dual.item() == pytest.approx(3.0)
    assert metrics["policy/dual_clip_frac"] == 1.0
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(lp, old, adv, torch.ones(1, 1), dual_clip=1.0)


@settings(max_examples=80, deadline=None)
@given(masked_batch(), st.floats(0.05, 0.4), st.floats(0.05, 0.6), st.one_of(st.none(), st.floats(1.5, 5.0)))
def test_policy_loss_matches_slow_reference(batch, lo, hi, dual):
    g, B, T, mask = batch
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    loss, _ = policy_loss(lp, old, adv, mask, lo, hi, dual)
    assert loss.item() == pytest.approx(slow_policy_loss(lp, old, adv, mask, lo, hi, dual), abs=1e-9)


def test_policy_gradient_raises_prob_of_positive_advantage_tokens():
    old = torch.tensor([[-1.0, -1.0]])
    lp = old.clone().requires_grad_(True)
    adv = torch.tensor([[2.0, -3.0]])
    loss, _ = policy_loss(lp, old, adv, torch.ones(1, 2))
    loss.backward()
    # gradient descent moves lp by -grad: up for A > 0, down for A < 0
    assert lp.grad[0, 0] < 0 and lp.grad[0, 1] > 0
    assert_values(lp.grad, [[-1.0, 1.5]])  # -A * ratio / N at ratio 1


def test_clipped_tokens_get_no_gradient():
    old = torch.zeros(1, 1)
    lp = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    loss, _ = policy_loss(lp, old, torch.tensor([[1.0]]), torch.ones(1, 1), clip_low=0.2)
    loss.backward()
    assert lp.grad.item() == 0.0


def test_is_weights_scale_the_loss():
    lp = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, 1.0]])
    w = torch.tensor([[0.5, 0.0]])
    loss, _ = policy_loss(lp, lp, adv, torch.ones(1, 2), is_weights=w)
    assert loss.item() == pytest.approx(-0.25)


def test_value_loss_hand_case_and_clipping():
    old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    m = torch.ones(1, 2)
    # token0: unclipped (1-2)^2 = 1, clipped v=0.2 -> (0.2-2)^2 = 3.24 -> max 3.24
    # token1: unclipped 0.01, clipped v=0.1 -> 0.01
    loss, metrics = value_loss(v, old, ret, m, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert metrics["value/clip_frac"] == pytest.approx(0.5)
    loss, _ = value_loss(v, old, ret, m, clip_range=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.01) / 2)


def test_value_clip_frac_counts_only_values_past_the_clip_range():
    # tokens 0-1 moved less than 0.2 from old_V; tokens 2-3 moved further, toward their return, so the
    # clipped branch is not the larger one there, yet the clip is what bounds them
    old = torch.tensor([[0.1, 0.0, 0.0, 0.0]])
    v = torch.tensor([[0.25, 0.2, 0.5, -0.25]])
    ret = torch.tensor([[5.0, -5.0, 0.0, 0.0]])
    _, metrics = value_loss(v, old, ret, torch.ones(1, 4), clip_range=0.2)
    assert metrics["value/clip_frac"] == pytest.approx(0.5)


def test_huge_ratio_with_negative_advantage_gets_no_gradient():
    # log ratio 25, A = -1, no dual clip: the unclamped gradient is e^25 = 7e10; clamped at 20 it is 0
    lp = torch.tensor([[25.0]], requires_grad=True)
    loss, metrics = policy_loss(lp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1))
    loss.backward()
    assert torch.isfinite(loss) and lp.grad.item() == 0.0
    assert metrics["policy/ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)


def test_value_gradient_moves_value_toward_return():
    v = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ret = torch.tensor([[1.0, -1.0]])
    loss, _ = value_loss(v, v.detach(), ret, torch.ones(1, 2), clip_range=None)
    loss.backward()
    assert v.grad[0, 0] < 0 and v.grad[0, 1] > 0


def test_entropy_loss_sign():
    ent = torch.tensor([[1.0, 3.0]], requires_grad=True)
    loss, metrics = entropy_loss(ent, torch.ones(1, 2))
    loss.backward()
    assert metrics["policy/entropy"] == pytest.approx(2.0)
    assert (ent.grad < 0).all()  # descending the loss raises entropy
    # the metric is the per-token mean whatever the aggregation
    _, metrics = entropy_loss(ent.detach(), torch.ones(1, 2), "seq-mean-token-sum")
    assert metrics["policy/entropy"] == pytest.approx(2.0)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, m).item() == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones(1, 4), m).item())
