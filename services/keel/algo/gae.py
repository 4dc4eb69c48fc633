"""Generalised advantage estimation and discounted returns over masked token sequences."""

from __future__ import annotations

import torch


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) per token, returning (advantages, returns), both (B, T).

    Over the valid tokens t_1 < t_2 < ... < t_n of a row (mask == 1), with V(t_{n+1}) = 0 since
    the response ends the episode:

        delta_k = r(t_k) + gamma * V(t_{k+1}) - V(t_k)
        A(t_k)  = delta_k + gamma * lambda * A(t_{k+1}),   A(t_{n+1}) = 0
        R(t_k)  = A(t_k) + V(t_k)                          (the critic's target)

    Masked-out positions (prompt, padding, or holes such as tool output in a multi-turn
    response) are skipped: they neither receive advantage nor break the recursion, which
    carries over them to the next valid token. Both outputs are 0 there, and a reward placed
    on a masked position is ignored.

    Shapes: rewards, values, mask (B, T). The rewards already hold everything per token: the
    KL penalty on each token and the sequence score on the last one.
    """
    mask = mask.to(values.dtype)
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    advantages = torch.zeros_like(values)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # On a masked position keep the carry untouched: the next valid token sees past it.
        next_adv = torch.where(m > 0, adv, next_adv)
        next_value = torch.where(m > 0, values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo returns G(t_k) = sum_{j >= k} gamma^(j-k) r(t_j) over valid tokens; (B, T).

    Masked positions are skipped like in `compute_gae` (they are not steps of the episode) and
    get 0. This is GAE with V = 0 and lambda = 1, written out because REINFORCE-style
    estimators use it without a critic.
    """
    mask = mask.to(rewards.dtype)
    B, T = rewards.shape
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    returns = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        m = mask[:, t]
        g = rewards[:, t] + gamma * running
        returns[:, t] = g * m
        running = torch.where(m > 0, g, running)
    return returns
