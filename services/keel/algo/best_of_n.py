"""Best-of-n: which of a prompt's n samples to keep, and what picking the best of k is worth.

Shapes: P prompts with n samples each. scores (P, n) is the reward of each sample; values (P, n)
is any other per-sample number to read off the pick (a 0/1 task metric); eligible (P, n) bool
marks the samples that may be picked.
"""

from __future__ import annotations

import math

import torch


def ladder(n: int) -> list[int]:
    """The k of a best-of-k curve: 1, 2, 4, ... below n, then n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return ks + [n]


def pick_best(scores: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) long: each prompt's highest-scored eligible sample; a tie goes to the lowest index, and a
    prompt with no eligible sample gets -1."""
    if eligible is None:
        eligible = torch.ones_like(scores, dtype=torch.bool)
    masked = scores.masked_fill(~eligible, float("-inf"))
    best = masked.argmax(-1)  # the first of equal maxima
    return torch.where(eligible.any(-1), best, torch.full_like(best, -1))


def keep_mask(
    scores: torch.Tensor, keep: str, threshold: float | None = None, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """(P, n) bool: the samples kept. keep "best": each prompt's `pick_best` (none when no sample is
    eligible); keep "threshold": every eligible sample with score >= threshold."""
    if eligible is None:
        eligible = torch.ones_like(scores, dtype=torch.bool)
    if keep == "threshold":
        if threshold is None:
            raise ValueError("keep threshold needs a threshold")
        return eligible & (scores >= threshold)
    if keep != "best":
        raise ValueError(f"keep must be best or threshold, got {keep!r}")
    best = pick_best(scores, eligible)
    kept = torch.zeros_like(eligible)
    rows = torch.nonzero(best >= 0).squeeze(-1)
    kept[rows, best[rows]] = True
    return kept


def best_of_first_k(scores: torch.Tensor, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, score) of the highest-scored of each prompt's first k samples (ties: the first), (P,)
    each. The curve a user gets by drawing k samples and keeping the best."""
    pick = scores[:, :k].argmax(-1, keepdim=True)
    return values.gather(-1, pick).squeeze(-1), scores.gather(-1, pick).squeeze(-1)


def best_of_k_unbiased(scores: torch.Tensor, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, score) of the highest-scored sample of a k-subset of each prompt's n samples, in
    expectation over the C(n, k) subsets drawn uniformly, ties broken at random; (P,) float64 each.

    The same quantity as `best_of_first_k` (whose first k are one random subset), from all n samples
    at once. A subset's top score is the level s_j of sample j with probability

        [C(le_j, k) - C(lt_j, k)] / C(n, k),   le_j = #{i: s_i <= s_j},  lt_j = #{i: s_i < s_j}

    (all k drawn from the le_j samples at or below s_j, not all from the lt_j below it). Given that
    level, the pick is uniform over the le_j - lt_j samples at it, by symmetry. So

        E[value of the pick] = sum_j value_j [C(le_j, k) - C(lt_j, k)] / (C(n, k) (le_j - lt_j)).

    At k = 1 this is the mean value; at k = n, the mean value of the top-scored samples.
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    le = (scores.unsqueeze(-2) <= scores.unsqueeze(-1)).sum(-1)  # (P, n): le[p, j] = #{i: s_pi <= s_pj}
    lt = (scores.unsqueeze(-2) < scores.unsqueeze(-1)).sum(-1)
    comb = torch.tensor([math.comb(m, k) for m in range(n + 1)], dtype=torch.float64)  # C(m, k), m = 0..n
    weight = (comb[le] - comb[lt]) / (comb[n] * (le - lt))  # (P, n), each row sums to 1
    return (weight * values.double()).sum(-1), (weight * scores.double()).sum(-1)
