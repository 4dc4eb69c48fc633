"""KL divergence to the reference policy: per-token estimators, and the two ways to use them.

With samples a ~ pi (the policy that generated them) and log_ratio = log pi(a) - log pi_ref(a),
Schulman's estimators of KL(pi || pi_ref) are

    k1 = log_ratio                              unbiased, high variance, can be negative
    k2 = 0.5 * log_ratio^2                      biased, low variance, >= 0
    k3 = (r - 1) - log r,  r = pi_ref / pi      unbiased, low variance, >= 0

The penalty either goes into the reward (`kl_reward_penalty`, PPO / REINFORCE++: -beta * k
on every token, no gradient) or into the loss (`kl_loss`, GRPO: + beta * k with gradient
through log pi).
"""

from __future__ import annotations

import torch

from keel.algo.masked import Aggregation, as_aggregation, masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3")

# Tail bounds, as in verl and OpenRLHF: one token whose reference probability collapsed must not
# turn a reward into -inf or a gradient into 1e10. Past a bound the estimate is constant, so its
# gradient is 0 there.
LOG_RATIO_BOUND = 20.0  # |log pi - log pi_ref| is clamped to this before any estimator
KL_BOUND = 10.0  # each per-token estimate is clamped to [-KL_BOUND, KL_BOUND]


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, bounded; (B, T) in, (B, T) out.

        x = clamp(log pi - log pi_ref, -20, 20),   k = clamp(k_est(x), -10, 10)

    Gradient flows through `logprobs` wherever neither bound is active.
    """
    log_ratio = (logprobs - ref_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.square()
    elif estimator == "k3":
        # r = pi_ref / pi = exp(-log_ratio); k3 = r - 1 - log r = exp(-x) - 1 + x
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    return kl.clamp(-KL_BOUND, KL_BOUND)


def kl_reward_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, coef: float, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token reward term -coef * k(t) on valid tokens, 0 elsewhere; (B, T), no gradient.

    Add it to the token rewards before advantage estimation (for group estimators, after the
    group normalisation of the scores: see `keel.algo.advantages`).
    """
    with torch.no_grad():
        kl = kl_estimate(logprobs, ref_logprobs, estimator)
    return -coef * kl * mask.to(kl.dtype)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl_penalty: torch.Tensor | None = None) -> torch.Tensor:
    """Place each sequence score on its last valid token and add the per-token KL penalty.

    scores (B,), mask (B, T), kl_penalty (B, T) or None -> rewards (B, T):
        r(t) = kl_penalty(t) + score * [t is the last valid token of the row]
    A row with no valid token gets no score (there is no action to credit).
    """
    mask = mask.to(scores.dtype)
    T = mask.shape[-1]
    # index of the last 1 in each row: argmax over mask * position picks the largest valid t
    positions = torch.arange(T, device=mask.device, dtype=scores.dtype)
    last = torch.argmax(mask * (positions + 1), dim=-1)
    rewards = torch.zeros_like(mask)
    has_token = mask.sum(-1) > 0
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = torch.where(has_token, scores, 0.0)
    if kl_penalty is not None:
        rewards = rewards + kl_penalty * mask
    return rewards


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str = "k3",
    agg: str | Aggregation = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL as a loss term: coef * agg_t k(t), gradient flowing through `logprobs`. (B, T) in.

    k1 has zero expected gradient here (E_pi[grad log pi] = 0): use k3 or k2 (the config refuses
    k1 with placement loss). Returns (loss, metrics) with `kl/loss` and `kl/mean` (the per-token
    mean estimate).
    """
    kl = kl_estimate(logprobs, ref_logprobs.detach(), estimator)
    loss = coef * as_aggregation(agg)(kl, mask)
    return loss, {"kl/loss": loss.item(), "kl/mean": masked_mean(kl.detach(), mask).item()}


def adaptive_kl_coef(coef: float, observed_kl: float, target_kl: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. (2019) proportional controller for the KL coefficient.

        e = clip(observed / target - 1, -0.2, 0.2)
        coef <- coef * (1 + e * n_steps / horizon)

    `n_steps` is the number of samples (or steps) since the last update.
    """
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
