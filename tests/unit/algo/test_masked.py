import pytest
import torch
from hypothesis import given, settings

from keel.algo.masked import aggregate_loss, masked_mean, masked_var, masked_whiten
from unit.algo.strategies import masked_batch


def test_masked_mean_hand_case():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(x, m, dim=-1).tolist() == pytest.approx([1.5, 3.0])


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = torch.ones(2, 3)
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


def test_masked_var_matches_torch_on_selected_elements():
    x = torch.tensor([[1.0, 4.0, 9.0, -50.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert masked_var(x, m).item() == pytest.approx(torch.tensor([1.0, 4.0, 9.0]).var().item())
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(
        torch.tensor([1.0, 4.0, 9.0]).var(unbiased=False).item()
    )


@settings(max_examples=60, deadline=None)
@given(masked_batch())
def test_whiten_gives_zero_mean_unit_var_on_valid_and_zero_elsewhere(batch):
    g, B, T, mask = batch
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 5
    out = masked_whiten(x, mask)
    assert torch.all(out[mask == 0] == 0)
    if mask.sum() >= 2 and masked_var(x, mask) > 1e-6:
        assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
        assert masked_var(out, mask).item() == pytest.approx(1.0, rel=1e-4)


def test_whiten_without_shift_keeps_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    m = torch.ones_like(x)
    out = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(out, m).item() == pytest.approx(2.5)


def test_aggregations_hand_case():
    loss = torch.tensor([[1.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0, 6.0]])
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert aggregate_loss(loss, m, "token-mean").item() == pytest.approx(16.0 / 6)
    assert aggregate_loss(loss, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 3.0) / 2)
    assert aggregate_loss(loss, m, "seq-mean-token-sum").item() == pytest.approx((4.0 + 12.0) / 2)
    assert aggregate_loss(loss, m, "seq-mean-token-sum-norm").item() == pytest.approx((4.0 + 12.0) / 2 / 4)
    assert aggregate_loss(loss, m, "seq-mean-token-sum-norm", norm_len=8).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown loss aggregation 'bogus'"):
        aggregate_loss(loss, m, "bogus")


@settings(max_examples=40, deadline=None)
@given(masked_batch(holes=False))
def test_token_mean_is_invariant_to_padding_width(batch):
    g, B, T, mask = batch
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    padded_loss = torch.cat([loss, torch.full((B, 3), 77.0, dtype=torch.float64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.float64)], dim=1)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert aggregate_loss(padded_loss, padded_mask, mode).item() == pytest.approx(
            aggregate_loss(loss, mask, mode).item()
        )
