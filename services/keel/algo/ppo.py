"""PPO losses: clipped policy surrogate, clipped value loss, entropy bonus."""

from __future__ import annotations

import torch

from keel.algo.kl import LOG_RATIO_BOUND
from keel.algo.masked import Aggregation, as_aggregation, masked_mean, masked_var


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str | Aggregation = "token-mean",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate, per token, aggregated by `agg`. All inputs (B, T).

        rho  = exp(clamp(log pi(a) - log pi_old(a), -20, 20))
        L    = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))     (clip_high defaults to clip_low)
        L'   = min(L, -c A)  where A < 0                                   (dual clip, c = dual_clip > 1)

    Asymmetric bounds (clip_high > clip_low, "clip-higher" in DAPO) let low-probability tokens
    grow faster. The dual clip bounds the loss of a token with negative advantage whose ratio
    has exploded, which plain PPO leaves unbounded. `is_weights` (B, T), when given, multiplies
    the per-token loss (truncated importance sampling for off-policy rollouts; no gradient).
    The log ratio is clamped like the KL's (verl, OpenRLHF): a token whose ratio is past e^20 with a
    negative advantage and no dual clip gets no gradient instead of one of 1e10.

    Metrics: policy/loss, policy/clip_frac (share of tokens where the clipped branch is active),
    policy/dual_clip_frac, policy/approx_kl (k3 estimate of KL(pi_old || pi), CleanRL's),
    policy/ratio_mean, policy/ratio_max.
    """
    if clip_high is None:
        clip_high = clip_low
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(loss_tok, dtype=torch.bool)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss_tok > cap)
        loss_tok = torch.where(advantages < 0, torch.minimum(loss_tok, cap), loss_tok)
    if is_weights is not None:
        loss_tok = loss_tok * is_weights.detach()
    loss = as_aggregation(agg)(loss_tok, mask)

    with torch.no_grad():
        m = mask.to(ratio.dtype)
        metrics = {
            "policy/loss": loss.item(),
            "policy/clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), m).item(),
            "policy/dual_clip_frac": masked_mean(dual_active.to(ratio.dtype), m).item(),
            "policy/approx_kl": masked_mean((ratio - 1.0) - log_ratio, m).item(),
            "policy/ratio_mean": masked_mean(ratio, m).item(),
            "policy/ratio_max": (ratio * m).max().item() if m.any() else 1.0,
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
    agg: str | Aggregation = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, per token; all inputs (B, T).

        V_clip = old_V + clip(V - old_V, -eps, eps)
        L      = 0.5 * max((V - R)^2, (V_clip - R)^2)        (0.5 * (V - R)^2 when clip_range is None)

    Metrics: value/loss, value/clip_frac (share of tokens whose V moved further than eps from
    old_V, so the clip is active), value/mean, value/explained_var.
    """
    unclipped = (values - returns).square()
    if clip_range is None:
        loss_tok = 0.5 * unclipped
        clip_frac = torch.zeros((), dtype=values.dtype)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (v_clipped - returns).square()
        loss_tok = 0.5 * torch.maximum(unclipped, clipped)
        moved = (values.detach() - old_values).abs() > clip_range
        clip_frac = masked_mean(moved.to(values.dtype), mask)
    loss = as_aggregation(agg)(loss_tok, mask)
    metrics = {
        "value/loss": loss.item(),
        "value/clip_frac": clip_frac.item(),
        "value/mean": masked_mean(values.detach(), mask).item(),
        "value/explained_var": explained_variance(values.detach(), returns, mask).item(),
    }
    return loss, metrics


def entropy_loss(
    entropy: torch.Tensor, mask: torch.Tensor, agg: str | Aggregation = "token-mean"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative aggregated entropy (minimising it maximises entropy); (B, T) per-token entropy in.

    The metric policy/entropy is the per-token mean, whatever `agg` is.
    """
    loss = -as_aggregation(agg)(entropy, mask)
    return loss, {"policy/entropy": masked_mean(entropy.detach(), mask).item()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens: 1 is a perfect critic, 0 no better than a constant.

    Returns NaN when the returns have no variance (the ratio is undefined), as CleanRL does.
    """
    var_r = masked_var(returns, mask)
    if var_r.item() == 0.0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask) / var_r
