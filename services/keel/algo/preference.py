"""Preference losses: DPO and its relatives (against a frozen reference), and the
Bradley-Terry loss that trains a reward model. Inputs are per-pair tensors of shape (B,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO-family loss from sequence log-probs log pi(y|x); each argument (B,).

        h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

        sigmoid (DPO, Rafailov et al. 2023):   L = -log sigma(beta h)
        conservative DPO (label_smoothing e):  L = -(1 - e) log sigma(beta h) - e log sigma(-beta h)
        ipo (Azar et al. 2023):                L = (h - 1 / (2 beta))^2

    Metrics: dpo/loss, dpo/reward_chosen and dpo/reward_rejected (the implicit rewards
    beta (log pi - log pi_ref)), dpo/margin, dpo/accuracy (share of pairs with chosen > rejected).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only, not ipo")
        losses = (h - 1.0 / (2.0 * beta)).square()
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    loss = losses.mean()
    with torch.no_grad():
        r_chosen = beta * chosen_logratio
        r_rejected = beta * rejected_logratio
        metrics = {
            "dpo/loss": loss.item(),
            "dpo/reward_chosen": r_chosen.mean().item(),
            "dpo/reward_rejected": r_rejected.mean().item(),
            "dpo/margin": (r_chosen - r_rejected).mean().item(),
            "dpo/accuracy": (r_chosen > r_rejected).float().mean().item(),
        }
    return loss, metrics


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-model loss on scalar rewards of (chosen, rejected) pairs; each (B,).

        L = -mean log sigma(r_w - r_l - m)

    The optional margin m (B,) (Llama 2) demands a larger gap for pairs rated far apart.
    Metrics: rm/loss, rm/accuracy (r_w > r_l), rm/margin (mean r_w - r_l).
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        gap = chosen - rejected
        metrics = {
            "rm/loss": loss.item(),
            "rm/accuracy": (gap > 0).float().mean().item(),
            "rm/margin": gap.mean().item(),
        }
    return loss, metrics
