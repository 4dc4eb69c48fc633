"""From logits to per-token log-probabilities and entropies."""

from __future__ import annotations

import torch


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per position; (B, T, V) and (B, T) -> (B, T).

    `logits[:, t]` must already be the distribution that produced `tokens[:, t]` (callers shift
    a causal LM's output by one). The temperature must be the one the sampler used, or the PPO
    ratio compares different distributions.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax(x)[k] = x_k - logsumexp(x); computed this way it avoids a (B, T, V) copy
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H = logsumexp(z) - sum_k softmax(z)_k z_k of each position, z = logits / temperature
    (the sampler's distribution, as in `gather_logprobs`); (B, T, V) -> (B, T)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t), or its per-token mean; (B, T) -> (B,)."""
    mask = mask.to(token_logprobs.dtype)
    total = (token_logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total
