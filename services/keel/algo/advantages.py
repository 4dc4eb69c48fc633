"""Advantage estimators: GAE (with a critic) and the critic-free family (GRPO, Dr. GRPO, RLOO,
REINFORCE++ and its baseline variant), behind one small registry.

Every estimator takes the same `AdvantageInputs` and returns (advantages, returns), both
(B, T) and 0 on masked positions. Group estimators (GRPO, Dr. GRPO, RLOO) normalise the scores
within each group, broadcast the result over the sample's valid tokens, and only then add the
KL penalty's return-to-go; `returns` is what a critic would regress to (for critic-free
estimators it is reported, not trained on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from keel.algo.gae import compute_gae, discounted_returns
from keel.algo.kl import token_rewards
from keel.algo.masked import masked_whiten


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use. Shapes: B sequences, T response tokens."""

    scores: torch.Tensor  # (B,) sequence reward from the reward model / function
    mask: torch.Tensor  # (B, T) 1 on response tokens the policy generated
    kl_penalty: torch.Tensor | None = None  # (B, T) -beta * KL per token when KL is in the reward
    values: torch.Tensor | None = None  # (B, T) critic values V(s_t); gae only
    group_index: torch.Tensor | None = None  # (B,) int prompt id: samples of one prompt share it


def group_mean_std(scores: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean, unbiased std and size of its group; (B,) each.

    A group of one sample has std 0 (there is nothing to compare it with).
    """
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    G = counts.shape[0]
    s = scores.double()
    sums = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, inverse, s)
    mean_g = sums / counts
    sq = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, inverse, (s - mean_g[inverse]) ** 2)
    std_g = torch.where(counts > 1, torch.sqrt(sq / (counts - 1).clamp(min=1)), torch.zeros_like(sq))
    size = counts[inverse]
    return mean_g[inverse].to(scores.dtype), std_g[inverse].to(scores.dtype), size


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): the sequence value on each valid token, 0 elsewhere."""
    return per_seq.unsqueeze(-1) * mask.to(per_seq.dtype)


def _with_kl(per_seq: torch.Tensor, inputs: AdvantageInputs, gamma: float) -> torch.Tensor:
    """(B,) group-normalised score -> (B, T) advantage: the score on every valid token plus the
    return-to-go of the per-token KL penalty, sum_{j>=t} gamma^(j-t) kl_penalty(j) (OpenRLHF's
    rule). The KL is added after the group normalisation, never inside it: standardising scores
    that tie would otherwise turn a 1e-3 KL difference into advantages of +-1."""
    adv = _broadcast(per_seq, inputs.mask)
    if inputs.kl_penalty is not None:
        adv = adv + discounted_returns(inputs.kl_penalty * inputs.mask, inputs.mask, gamma)
    return adv


def _returns(inputs: AdvantageInputs, gamma: float) -> torch.Tensor:
    """(B, T) what a critic would regress to: score on the last token plus the KL penalty, discounted."""
    return discounted_returns(token_rewards(inputs.scores, inputs.mask, inputs.kl_penalty), inputs.mask, gamma)


def _require_groups(inputs: AdvantageInputs, name: str) -> torch.Tensor:
    if inputs.group_index is None:
        raise ValueError(f"{name} needs group_index: the prompt each sample answers")
    return inputs.group_index


def gae_advantages(inputs: AdvantageInputs, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO with a critic: GAE(gamma, lambda) over token rewards (KL penalty per token, score on
    the last token). See `compute_gae`."""
    if inputs.values is None:
        raise ValueError("gae needs critic values")
    rewards = token_rewards(inputs.scores, inputs.mask, inputs.kl_penalty)
    return compute_gae(rewards, inputs.values, inputs.mask, gamma, lam)


def grpo_advantages(
    inputs: AdvantageInputs, gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024): A_i(t) = (s_i - mean_g s) / (std_g s + eps) + KL_i(t).

    g is the group of samples for one prompt; std is unbiased; s are the scores alone. KL_i(t) is
    the return-to-go of the KL penalty when KL is in the reward (see `_with_kl`). A group of one
    gets a score term of 0. lam is unused (outcome reward); gamma discounts the KL term only.
    """
    s = inputs.scores
    mean, std, size = group_mean_std(s, _require_groups(inputs, "grpo"))
    adv = torch.where(size > 1, (s - mean) / (std + eps), torch.zeros_like(s))
    return _with_kl(adv, inputs, gamma), _returns(inputs, gamma)


def dr_grpo_advantages(
    inputs: AdvantageInputs, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (Liu et al. 2025): A_i(t) = s_i - mean_g s + KL_i(t), no division by the group std
    (which over-weights near-solved prompts). Pair it with the `seq-mean-token-sum-norm` loss
    aggregation, which removes GRPO's per-sequence length normalisation."""
    s = inputs.scores
    mean, _, size = group_mean_std(s, _require_groups(inputs, "dr_grpo"))
    adv = torch.where(size > 1, s - mean, torch.zeros_like(s))
    return _with_kl(adv, inputs, gamma), _returns(inputs, gamma)


def rloo_advantages(inputs: AdvantageInputs, gamma: float = 1.0, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline within each group of n samples,

        A_i(t) = s_i - 1/(n-1) sum_{j != i} s_j + KL_i(t) = n/(n-1) (s_i - mean_g s) + KL_i(t).

    A group of one gets a score term of 0.
    """
    s = inputs.scores
    mean, _, size = group_mean_std(s, _require_groups(inputs, "rloo"))
    n = size.to(s.dtype)
    adv = torch.where(size > 1, n / (n - 1).clamp(min=1.0) * (s - mean), torch.zeros_like(s))
    return _with_kl(adv, inputs, gamma), _returns(inputs, gamma)


def reinforce_pp_advantages(
    inputs: AdvantageInputs, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted token returns, whitened over the whole batch,

    r(t) = -beta k(t) + score [t last],  G(t) = sum_{j>=t} gamma^(j-t) r(j),  A = whiten_batch(G).
    """
    rewards = token_rewards(inputs.scores, inputs.mask, inputs.kl_penalty)
    returns = discounted_returns(rewards, inputs.mask, gamma)
    return masked_whiten(returns, inputs.mask), returns


def reinforce_pp_baseline_advantages(
    inputs: AdvantageInputs, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ with a group baseline: subtract the group mean of the raw scores first (the
    KL terms stay per sample), then discounted returns and batch whitening as in REINFORCE++.

        score'_i = score_i - mean_g score,   A = whiten_batch(G(score', k))
    """
    mean, _, _ = group_mean_std(inputs.scores, _require_groups(inputs, "reinforce_pp_baseline"))
    rewards = token_rewards(inputs.scores - mean, inputs.mask, inputs.kl_penalty)
    returns = discounted_returns(rewards, inputs.mask, gamma)
    return masked_whiten(returns, inputs.mask), returns


Estimator = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]

ESTIMATORS: dict[str, Estimator] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}

# Estimators that need a group of samples per prompt (n >= 2) and those that need a critic.
GROUP_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})
CRITIC_ESTIMATORS = frozenset({"gae"})


def compute_advantages(
    name: str, inputs: AdvantageInputs, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the estimator registered under `name`; returns (advantages, returns), (B, T)."""
    try:
        fn = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {', '.join(ESTIMATORS)}") from None
    return fn(inputs, gamma=gamma, lam=lam)
