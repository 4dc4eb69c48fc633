"""Masked reductions over (B, T) token tensors.

Every per-token quantity in Keel lives in a (B, T) tensor next to a (B, T) mask that is 1 on
response tokens the policy produced and 0 on prompt and padding positions. These helpers are
the only place where masking rules are written down; everything else calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Aggregation:
    """How a (B, T) per-token loss becomes a scalar: the mode, Dr. GRPO's constant length, and
    the divisor.

    A mini-batch is often split into micro-batches and data-parallel ranks. For the update to be
    the same however it is split, each piece's loss must be its *sum* over loss units divided by
    the units of the whole mini-batch (`units`, computed once with `loss_units` on the whole
    mini-batch's mask), never a mean over the piece. With `units` unset the piece is the whole
    batch.
    """

    mode: str = "token-mean"
    norm_len: int | None = None  # L of seq-mean-token-sum-norm: rollout.sampling.max_new_tokens
    units: float | None = None  # the global divisor; None = this batch's own loss_units

    def __call__(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(loss, mask, self.mode, self.norm_len, self.units)


def as_aggregation(agg: str | Aggregation) -> Aggregation:
    return agg if isinstance(agg, Aggregation) else Aggregation(agg)


def loss_units(mask: torch.Tensor, mode: str = "token-mean") -> float:
    """The divisor of `mode` over a (B, T) mask: what the loss is a mean of.

    token-mean               valid tokens                         sum_bt m
    seq-mean-token-mean      sequences with at least one token    sum_b [sum_t m > 0]
    seq-mean-token-sum(-norm) sequences                           B
    """
    if mode == "token-mean":
        return float(mask.sum().item())
    if mode == "seq-mean-token-mean":
        return float((mask.sum(-1) > 0).sum().item())
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        return float(mask.shape[0])
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    norm_len: int | None = None,
    units: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar: sum over the batch's units / `units`.

    token-mean               sum_bt l m / N_tok                        (every token weighs the same; PPO/DAPO)
    seq-mean-token-mean      sum_b [ sum_t l m / sum_t m ] / N_seq>0   (every sequence weighs the same; GRPO)
    seq-mean-token-sum       sum_b [ sum_t l m ] / B
    seq-mean-token-sum-norm  sum_b [ sum_t l m ] / (B L)               (Dr. GRPO: L a constant, never the
                                                                        padded width, so padding is inert)

    `units` replaces the divisor (N_tok, N_seq>0 or B) with the whole mini-batch's, when `loss` is
    one micro-batch or rank's share of it (see `Aggregation`). A batch with no units gives 0.
    """
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        total = masked_sum(loss, mask)
    elif mode == "seq-mean-token-mean":
        total = (masked_sum(loss, mask, dim=-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif mode == "seq-mean-token-sum":
        total = masked_sum(loss, mask, dim=-1).sum()
    elif mode == "seq-mean-token-sum-norm":
        if norm_len is None:
            raise ValueError("seq-mean-token-sum-norm needs norm_len, a constant (rollout.sampling.max_new_tokens)")
        total = masked_sum(loss, mask, dim=-1).sum() / norm_len
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")
    divisor = loss_units(mask, mode) if units is None else units
    return total / max(divisor, 1.0)
