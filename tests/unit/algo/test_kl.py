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


def test_tails_are_bounded_as_in_the_references():
    # lp = 0, ref = 5: k3 = e^5 - 1 - 5 = 142 unbounded; verl and OpenRLHF give 10
    assert kl_estimate(torch.tensor([[0.0]]), torch.tensor([[5.0]]), "k3").item() == pytest.approx(10.0)
    # a log ratio of -100 in float32: exp(100) is inf, the bounded penalty is finite
    lp, ref, m = torch.tensor([[-100.0]]), torch.tensor([[0.0]]), torch.ones(1, 1)
    for est in ("k1", "k2", "k3"):
        pen = kl_reward_penalty(lp, ref, m, coef=0.1, estimator=est)
        assert torch.isfinite(pen).all() and pen.abs().max() <= 1.0 + 1e-6, est
    assert kl_estimate(torch.tensor([[-1000.0]]), torch.tensor([[0.0]]), "k1").item() == -10.0


def test_kl_loss_has_no_gradient_in_the_clamped_tail():
    # log ratios [-5, -0.5] with k3: the first is past the bound (k3 = 142 > 10) and gets no gradient;
    # the second gets coef * (1 - e^0.5) / 2 = -0.32 (verl: [0, -0.32]; unbounded: [-73.7, -0.32])
    ref = torch.zeros(1, 2)
    lp = torch.tensor([[-5.0, -0.5]], requires_grad=True)
    loss, _ = kl_loss(lp, ref, torch.ones(1, 2), coef=1.0, estimator="k3")
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0
    assert lp.grad[0, 1].item() == pytest.approx((1 - math.exp(0.5)) / 2)


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


@pytest.mark.parametrize("est", ["k2", "k3"])
def test_kl_loss_gradient_pulls_policy_toward_reference_from_both_sides(est):
    # Token 0 is likelier under the policy than under the reference, token 1 less likely: descending
    # the KL loss must push the first log-prob down and the second up.
    ref = torch.tensor([[-2.0, -2.0]])
    lp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    loss, metrics = kl_loss(lp, ref, torch.ones(1, 2), coef=0.5, estimator=est)
    loss.backward()
    assert lp.grad[0, 0] > 0 > lp.grad[0, 1], lp.grad
    assert metrics["kl/loss"] == pytest.approx(loss.item())


def test_k1_in_the_loss_has_zero_expected_gradient():
    """Why the config refuses k1 with placement loss: its gradient is the constant coef per token,
    sum_a pi(a) d/dtheta log pi(a) = 0 in expectation; k3's is not."""
    logits = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.0, 0.0]), -1)
    probs = torch.softmax(logits, -1).detach()

    def expected_grad(est):
        total = torch.zeros(3)
        for a in range(3):
            lp = torch.log_softmax(logits, -1)[a].reshape(1, 1)
            loss, _ = kl_loss(lp, ref[a].reshape(1, 1), torch.ones(1, 1), coef=1.0, estimator=est)
            (g,) = torch.autograd.grad(loss, logits)
            total += probs[a] * g
        return total

    assert expected_grad("k1").abs().max() < 1e-6
    assert expected_grad("k3").abs().max() > 1e-2


def test_adaptive_kl_controller_moves_toward_target():
    assert adaptive_kl_coef(0.1, observed_kl=2.0, target_kl=1.0, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, observed_kl=0.5, target_kl=1.0, horizon=100, n_steps=10) == pytest.approx(0.1 * 0.98)
    assert adaptive_kl_coef(0.1, observed_kl=1.0, target_kl=1.0, horizon=100, n_steps=10) == pytest.approx(0.1)
