import math

import pytest
import torch

from keel.algo.preference import bradley_terry_loss, dpo_loss


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_at_reference_is_log2():
    z = _t(-5.0, -3.0)
    loss, metrics = dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["dpo/margin"] == pytest.approx(0.0)


def test_dpo_hand_case():
    # h = (-1 - -2) - (-3 - -2) = 2 ; beta 0.5 -> -log sigma(1)
    loss, metrics = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert metrics["dpo/reward_chosen"] == pytest.approx(0.5)
    assert metrics["dpo/reward_rejected"] == pytest.approx(-0.5)
    assert metrics["dpo/accuracy"] == 1.0


def test_conservative_dpo_label_smoothing():
    e, beta, h = 0.1, 0.5, 2.0
    loss, _ = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=beta, label_smoothing=e)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.item() == pytest.approx(-(1 - e) * math.log(sig(beta * h)) - e * math.log(sig(-beta * h)))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), label_smoothing=0.5)


def test_ipo_hand_case():
    loss, _ = dpo_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx((2.0 - 1.0) ** 2)
    with pytest.raises(ValueError, match="unknown DPO loss type 'kto'"):
        dpo_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), loss_type="kto")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    for loss_type in ("sigmoid", "ipo"):
        chosen = _t(-2.0).requires_grad_(True)
        rejected = _t(-2.0).requires_grad_(True)
        loss, _ = dpo_loss(chosen, rejected, _t(-2.0), _t(-2.0), beta=0.1, loss_type=loss_type)
        loss.backward()
        assert chosen.grad.item() < 0 < rejected.grad.item(), loss_type


def test_ipo_regularises_toward_fixed_margin():
    # Past the target margin 1/(2 beta) the IPO gradient reverses (DPO's never does).
    chosen = _t(10.0).requires_grad_(True)
    loss, _ = dpo_loss(chosen, _t(0.0), _t(0.0), _t(0.0), beta=0.5, loss_type="ipo")
    loss.backward()
    assert chosen.grad.item() > 0


def test_bradley_terry_hand_case_and_margin():
    loss, metrics = bradley_terry_loss(_t(2.0, 0.0), _t(1.0, 1.0))
    want = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(1)))) / 2
    assert loss.item() == pytest.approx(want)
    assert metrics["rm/accuracy"] == 0.5
    with_margin, _ = bradley_terry_loss(_t(2.0), _t(1.0), margin=_t(1.0))
    assert with_margin.item() == pytest.approx(math.log(2))


def test_bradley_terry_gradient_separates_pair():
    c, r = _t(0.0).requires_grad_(True), _t(0.0).requires_grad_(True)
    loss, _ = bradley_terry_loss(c, r)
    loss.backward()
    assert c.grad.item() < 0 < r.grad.item()
