"""Masked reductions over (B, T) token tensors.

Every per-token quantity in Keel lives in a (B, T) tensor next to a (B, T) mask that is 1 on
response tokens the policy produced and 0 on prompt and padding positions. These helpers are
the only place where masking rules are written down; everything else calls them.
"""

from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_i x_i * m_i over `dim` (all elements when None)."""
    prod = x * mask
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * m) / sum(m) over `dim` (all elements when None).

    An all-zero mask gives 0 rather than NaN: an empty slice contributes nothing.
    """
    mask = mask.to(x.dtype)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements of x (all dims), Bessel-corrected when `unbiased`.

    var = sum(m (x - mu)^2) / (N - 1), mu = masked_mean(x, m), N = sum(m). Needs N >= 2 when
    unbiased; a single element has variance 0.
    """
    mask = mask.to(x.dtype)
    mu = masked_mean(x, mask)
    n = mask.sum()
    sq = masked_sum((x - mu) ** 2, mask)
    if unbiased:
        return sq / (n - 1).clamp(min=1.0)
    return sq / n.clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) over the masked elements; masked-out positions become 0.

    With shift_mean=False the mean is added back: (x - mu) / sigma + mu, which rescales
    without re-centring (used for rewards, where the sign carries meaning).
    """
    mask = mask.to(x.dtype)
    mu = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu
    return out * mask


def aggregate_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_len: int | None = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    token-mean               sum_bt l m / sum_bt m            (every token weighs the same; PPO/DAPO)
    seq-mean-token-mean      mean_b [ sum_t l m / sum_t m ]   (every sequence weighs the same; GRPO paper)
    seq-mean-token-sum       mean_b [ sum_t l m ]
    seq-mean-token-sum-norm  mean_b [ sum_t l m ] / L          (Dr. GRPO: L a constant, default T)
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum-norm":
        length = norm_len if norm_len is not None else loss.shape[-1]
        return masked_sum(loss, mask, dim=-1).mean() / length
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")
