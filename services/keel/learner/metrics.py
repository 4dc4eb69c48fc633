"""Update metrics of one learner rank, reduced over every micro-batch of every rank.

Three kinds of metric come out of a micro-batch's losses (`keel.algo`):
- `*/loss`: the micro-batch's share of its mini-batch loss (a sum over its units divided by the
  whole mini-batch's units), so shares add up, over micro-batches and ranks, to the mini-batch
  loss; reported as the mean over mini-batches.
- `*_max`: a maximum over tokens; reported as the maximum over everything.
- the rest (clip fractions, approx KL, entropy, grad norm, ...): means, weighted by the tokens
  each micro-batch holds.
"""

from __future__ import annotations

import math

import torch


class UpdateMetrics:
    def __init__(self):
        self._sums: dict[str, float] = {}  # loss shares, or weight * value for means
        self._weights: dict[str, float] = {}  # means only
        self._maxes: dict[str, float] = {}
        self._mini_batches = 0

    def add(self, metrics: dict[str, float], weight: float = 1.0) -> None:
        """One micro-batch's metrics; `weight` (its token count) weighs the means."""
        for key, value in metrics.items():
            value = float(value)
            if key.endswith("/loss"):
                self._sums[key] = self._sums.get(key, 0.0) + value
            elif key.endswith("_max"):
                self._maxes[key] = max(self._maxes.get(key, -math.inf), value)
            else:
                w = 0.0 if math.isnan(value) else weight  # an undefined value (no variance) carries no weight
                self._sums[key] = self._sums.get(key, 0.0) + (w * value if w else 0.0)
                self._weights[key] = self._weights.get(key, 0.0) + w

    def end_mini_batch(self) -> None:
        self._mini_batches += 1

    def reduce(self, world_size: int) -> dict[str, float]:
        """The metrics over every rank (a collective when world_size > 1: every rank calls it)."""
        sums, weights, maxes = dict(self._sums), dict(self._weights), dict(self._maxes)
        if world_size > 1:
            keys: list = [None] * world_size  # ranks may lack a key (e.g. a NaN-only metric): take the union
            torch.distributed.all_gather_object(keys, (sorted(sums), sorted(weights), sorted(maxes)))
            sum_keys = sorted({k for ks in keys for k in ks[0]})
            weight_keys = sorted({k for ks in keys for k in ks[1]})
            max_keys = sorted({k for ks in keys for k in ks[2]})
            flat = torch.tensor(
                [sums.get(k, 0.0) for k in sum_keys] + [weights.get(k, 0.0) for k in weight_keys], dtype=torch.float64
            )
            torch.distributed.all_reduce(flat)
            sums = dict(zip(sum_keys, flat[: len(sum_keys)].tolist(), strict=True))
            weights = dict(zip(weight_keys, flat[len(sum_keys) :].tolist(), strict=True))
            top = torch.tensor([maxes.get(k, -math.inf) for k in max_keys], dtype=torch.float64)
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
            maxes = dict(zip(max_keys, top.tolist(), strict=True))
        out: dict[str, float] = {}
        for key, total in sums.items():
            if key.endswith("/loss"):
                out[key] = total / max(self._mini_batches, 1)
            else:
                w = weights.get(key, 0.0)
                out[key] = total / w if w > 0 else math.nan
        out.update(maxes)
        return out
