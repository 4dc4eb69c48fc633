import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.algo.gae import compute_gae, discounted_returns
from unit.algo.strategies import masked_batch


def slow_gae(rewards, values, mask, gamma, lam):
    """Reference: compact each row to its valid tokens, run textbook GAE, scatter back."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        r = [rewards[b, t].item() for t in idx]
        v = [values[b, t].item() for t in idx] + [0.0]
        a, out = 0.0, [0.0] * len(idx)
        for k in reversed(range(len(idx))):
            delta = r[k] + gamma * v[k + 1] - v[k]
            a = delta + gamma * lam * a
            out[k] = a
        for k, t in enumerate(idx):
            adv[b, t] = out[k]
    return adv, (adv + values) * mask


def test_gae_hand_computed():
    # one row, three tokens, reward only at the end
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.7  # last: r + 0 - V
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a2 = d2
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])


def test_gae_skips_padding_and_holes():
    r = torch.tensor([[0.0, 5.0, 1.0, 9.0]])  # 5.0 and 9.0 sit on masked positions: ignored
    v = torch.tensor([[0.5, 3.0, 0.7, 4.0]])
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    adv, ret = compute_gae(r, v, m, gamma=1.0, lam=1.0)
    # compacted row: r = [0, 1], v = [0.5, 0.7] -> A1 = 1 - 0.7 = 0.3, A0 = (0 + 0.7 - 0.5) + 0.3 = 0.5
    assert adv[0].tolist() == pytest.approx([0.5, 0.0, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0])


def test_gae_with_lambda_one_and_zero_values_is_monte_carlo_return():
    r = torch.tensor([[0.1, -0.2, 1.0]])
    m = torch.ones(1, 3)
    adv, _ = compute_gae(r, torch.zeros(1, 3), m, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, discounted_returns(r, m, 0.9))


@settings(max_examples=80, deadline=None)
@given(masked_batch(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_matches_slow_reference(batch, gamma, lam):
    g, B, T, mask = batch
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = slow_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


@settings(max_examples=40, deadline=None)
@given(masked_batch(), st.floats(0.0, 1.0))
def test_discounted_returns_matches_slow_reference(batch, gamma):
    g, B, T, mask = batch
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    out = discounted_returns(rewards, mask, gamma)
    ref, _ = slow_gae(rewards, torch.zeros(B, T, dtype=torch.float64), mask, gamma, 1.0)
    torch.testing.assert_close(out, ref)


def test_gae_rows_are_independent():
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    m = (torch.rand(4, 6, generator=g) > 0.2).float()
    full, _ = compute_gae(r, v, m, 0.99, 0.95)
    for b in range(4):
        row, _ = compute_gae(r[b : b + 1], v[b : b + 1], m[b : b + 1], 0.99, 0.95)
        torch.testing.assert_close(full[b : b + 1], row)
