"""From a scored batch to advantages and returns: the controller's use of `keel.algo`."""

from __future__ import annotations

from keel.algo import AdvantageInputs, compute_advantages, kl_estimate, kl_reward_penalty, masked_mean, masked_whiten
from keel.config import AlgorithmConfig, kl_estimator
from keel.trajectory import Trajectories


def add_advantages(
    traj: Trajectories, algo: AlgorithmConfig, kl_coef: float, normalize_scores: bool = False
) -> Trajectories:
    """Fill `advantages` and `returns` from scores, the KL to the reference and critic values.

    Needs scores and old_logprobs; ref_logprobs when a KL term is on; values for gae.
    """
    mask = traj.response_mask.float()
    scores = traj.scores
    if normalize_scores and len(scores) > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-6)
    kl_penalty = None
    if algo.kl.placement == "reward" and kl_coef > 0 and traj.ref_logprobs is not None:
        kl_penalty = kl_reward_penalty(traj.old_logprobs, traj.ref_logprobs, mask, kl_coef, kl_estimator(algo.kl))
    inputs = AdvantageInputs(
        scores=scores, mask=mask, kl_penalty=kl_penalty, values=traj.values, group_index=traj.group_index
    )
    advantages, returns = compute_advantages(algo.estimator, inputs, gamma=algo.gamma, lam=algo.lam)
    if algo.estimator == "gae" and algo.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return traj.with_fields(advantages=advantages.float(), returns=returns.float())


def sequence_kl(traj: Trajectories, estimator: str = "k1") -> float:
    """Mean over samples of sum_t KL_t(pi_old || pi_ref): the per-sequence KL to the reference."""
    if traj.ref_logprobs is None:
        return 0.0
    mask = traj.response_mask.float()
    per_token = kl_estimate(traj.old_logprobs, traj.ref_logprobs, estimator) * mask
    return per_token.sum(-1).mean().item()


def logprob_gap(traj: Trajectories) -> dict[str, float]:
    """How far the sampler's log-probs are from the learner's: a silent mismatch shows up here."""
    mask = traj.response_mask.float()
    diff = (traj.behaviour_logprobs - traj.old_logprobs).abs()
    return {
        "rollout/logprob_gap_mean": masked_mean(diff, mask).item(),
        "rollout/logprob_gap_max": (diff * mask).max().item() if mask.any() else 0.0,
    }
