"""Hypothesis strategies for random (B, T) batches with masks."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def masked_batch(draw, max_b: int = 5, max_t: int = 9, holes: bool = True):
    """(values, mask) with B, T random; masks are right-padded responses, optionally with holes."""
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).double()
    if holes and draw(st.booleans()):
        mask = mask * (torch.rand(B, T, generator=g) > 0.3).double()
    return g, B, T, mask


def assert_values(tensor: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """Compare a tensor with nested Python numbers (pytest.approx does not nest)."""
    want = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(tensor.detach().double(), want, atol=atol, rtol=1e-6)
