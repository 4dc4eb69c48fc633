import math

import pytest
import torch

from keel.algo.kl import adaptive_kl_coef, kl_estimate, kl_loss, kl_reward_penalty, token_rewards
from unit.algo.strategies import assert_values


def test_estimators_hand_values():
    lp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    x = math.log(2.0)  # log pi - log pi_ref
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(x)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * x * x)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + x)  # r = 0.25/0.5
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(lp, ref, "k4")


def test_estimators_are_unbiased_or_not_as_documented():
    # Sample from pi = N-ish categorical; the true KL(pi || ref) is known in closed form.
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum().item()
    a = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[a], q.log()[a]
    k1 = kl_estimate(lp, lq, "k1").mean().item()
    k3 = kl_estimate(lp, lq, "k3").mean().item()
    assert k1 == pytest.approx(true_kl, abs=0.01)
    assert k3 == pytest.approx(true_kl, abs=0.01)
    assert (kl_estimate(lp, lq, "k3") >= 0).all()
    assert (kl_estimate(lp, lq, "k2") >= 0).all()


def test_k3_clamp_keeps_it_finite():
    lp = torch.tensor([[0.0]])
    ref = torch.tensor([[-1000.0]])
    assert torch.isfinite(kl_estimate(ref, lp, "k3", clamp=10.0)).all()
    assert not torch.isfinite(kl_estimate(ref, lp, "k3")).all()


def test_reward_penalty_is_masked_and_has_no_grad():
    lp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -1.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    pen = kl_reward_penalty(lp, ref, m, coef=0.1, estimator="k1")
    assert_values(pen, [[-0.1, 0.0, 0.0]])
    assert not pen.requires_grad


def test_token_rewards_puts_score_on_last_valid_token():
    scores = torch.tensor([1.0, 2.0, 3.0])
    m = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]).float()
    kl = torch.full((3, 4), -0.1)
    r = token_rewards(scores, m, kl)
    assert_values(r, [[-0.1, 0.9, 0, 0], [-0.1, 0, 1.9, 0], [0, 0, 0, 0]])


def test_kl_loss_gradient_pulls_policy_toward_reference():
    # Policy puts more log-prob on the sampled token than the reference: minimising the KL
    # loss must push log pi down (positive gradient), whichever estimator.
    ref = torch.tensor([[-2.0, -2.0]])
    m = torch.ones(1, 2)
    for est in ("k1", "k2", "k3"):
        lp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
        loss, metrics = kl_loss(lp, ref, m, coef=0.5, estimator=est)
        loss.backward()
        assert (lp.grad > 0).all(), est
        assert metrics["kl/loss"] == pytest.approx(loss.item())


def test_adaptive_kl_controller_moves_toward_target():
    assert adaptive_kl_coef(0.1, observed_kl=2.0, target_kl=1.0, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, observed_kl=0.5, target_kl=1.0, horizon=100, n_steps=10) == pytest.approx(0.1 * 0.98)
    assert adaptive_kl_coef(0.1, observed_kl=1.0, target_kl=1.0, horizon=100, n_steps=10) == pytest.approx(0.1)
