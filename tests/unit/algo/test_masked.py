import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.algo.masked import (
    LOSS_AGGREGATIONS,
    Aggregation,
    aggregate_loss,
    loss_units,
    masked_mean,
    masked_var,
    masked_whiten,
)
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
    var = masked_var(x, mask).item()
    if mask.sum() >= 2 and var > 1e-6:
        assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
        # unit variance up to the eps under the square root: var / (var + 1e-8)
        assert masked_var(out, mask).item() == pytest.approx(var / (var + 1e-8), rel=1e-9)


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
    assert aggregate_loss(loss, m, "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx((4.0 + 12.0) / 2 / 4)
    assert aggregate_loss(loss, m, "seq-mean-token-sum-norm", norm_len=8).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs norm_len"):  # never the padded width
        aggregate_loss(loss, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss aggregation 'bogus'"):
        aggregate_loss(loss, m, "bogus")


@settings(max_examples=40, deadline=None)
@given(masked_batch())
def test_every_mode_is_invariant_to_padding_width(batch):
    """All-masked padding columns change nothing in any mode (Dr. GRPO divides by a constant L,
    not by the padded width)."""
    g, B, T, mask = batch
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    padded_loss = torch.cat([loss, torch.full((B, 3), 77.0, dtype=torch.float64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.float64)], dim=1)
    for mode in LOSS_AGGREGATIONS:
        agg = Aggregation(mode, norm_len=16)
        assert agg(padded_loss, padded_mask).item() == pytest.approx(agg(loss, mask).item(), abs=1e-12)


def test_seq_mean_token_mean_leaves_empty_rows_out():
    loss = torch.tensor([[1.0, 3.0], [5.0, 5.0], [9.0, 9.0]])
    m = torch.tensor([[1, 1], [1, 0], [0, 0]])
    assert loss_units(m, "seq-mean-token-mean") == 2
    assert aggregate_loss(loss, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 5.0) / 2)
    assert loss_units(m, "token-mean") == 3 and loss_units(m, "seq-mean-token-sum") == 3


@settings(max_examples=60, deadline=None)
@given(masked_batch(max_b=8), st.integers(1, 8))
def test_shares_with_the_global_divisor_add_up_to_the_whole(batch, pieces):
    """However a batch is cut into micro-batches, the shares (sum over units / the whole batch's
    units) add up to the whole batch's loss, in every mode."""
    g, B, T, mask = batch
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    for mode in LOSS_AGGREGATIONS:
        whole = Aggregation(mode, norm_len=T + 2)
        shared = Aggregation(mode, norm_len=T + 2, units=loss_units(mask, mode))
        cuts = torch.arange(B).chunk(min(pieces, B))
        total = sum(shared(loss[c], mask[c]) for c in cuts)
        assert total.item() == pytest.approx(whole(loss, mask).item(), abs=1e-9), mode
