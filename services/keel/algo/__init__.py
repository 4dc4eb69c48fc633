"""Keel's RL math: pure functions on torch tensors, no I/O, no Ray, no DeepSpeed.

Shapes follow one convention: B sequences, T response tokens, V vocabulary. Per-token
quantities are (B, T) next to a (B, T) mask that is 1 on tokens the policy generated.
Losses return (loss, metrics) with namespaced metric keys.
"""

from keel.algo.advantages import (
    CRITIC_ESTIMATORS,
    ESTIMATORS,
    GROUP_ESTIMATORS,
    AdvantageInputs,
    compute_advantages,
)
from keel.algo.gae import compute_gae, discounted_returns
from keel.algo.kl import adaptive_kl_coef, kl_estimate, kl_loss, kl_reward_penalty, token_rewards
from keel.algo.logprobs import entropy_from_logits, gather_logprobs, sequence_logprobs
from keel.algo.masked import (
    Aggregation,
    aggregate_loss,
    loss_units,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from keel.algo.ppo import entropy_loss, explained_variance, policy_loss, value_loss
from keel.algo.preference import bradley_terry_loss, dpo_loss

__all__ = [
    "CRITIC_ESTIMATORS",
    "ESTIMATORS",
    "GROUP_ESTIMATORS",
    "AdvantageInputs",
    "Aggregation",
    "adaptive_kl_coef",
    "aggregate_loss",
    "bradley_terry_loss",
    "compute_advantages",
    "compute_gae",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "entropy_loss",
    "explained_variance",
    "gather_logprobs",
    "kl_estimate",
    "kl_loss",
    "kl_reward_penalty",
    "loss_units",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "sequence_logprobs",
    "token_rewards",
    "value_loss",
]
