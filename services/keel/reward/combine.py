"""Several reward sources into one reward per sample (`reward.sources`).

For a batch of B samples scored by S sources, raw (B, S), the reward of sample b is

    r_b = clip( sum_i weight_i * normalize_i(raw[:, i])_b )      clip: reward.clip, when set

with normalize_i, per source i (its `normalize`):
    none    raw[:, i]
    clip    raw[:, i] clamped to [-clip_i, clip_i]
    whiten  (raw[:, i] - mean_i) / max(std_i, STD_FLOOR), mean and std of source i over the batch

Whitening needs the whole batch, but the job's reward actors each score a shard of it
(`reward.replicas`): so the actors return raw per-source scores, the controller joins them in
batch order and calls `combine` once, here. reward.normalize (whitening of r over the batch) is
applied later, with the advantages (keel.controller.advantages), as for a single source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.config import RewardConfig, RewardSourceBase, reward_sources, source_name
from keel.reward.model import RewardError

STD_FLOOR = 1e-6  # a source that is (nearly) constant over the batch whitens to ~0, not to noise / 0


@dataclass(frozen=True)
class CombinedReward:
    scores: torch.Tensor  # (B,) float32: the reward of each sample
    metrics: dict[str, float]  # reward/<name>_mean: each source's raw mean over the batch


def check_sources(raw: torch.Tensor, names: list[str], ids: list[str] | None = None) -> None:
    """Raise RewardError unless `raw` is (B, len(names)) of finite numbers; names the first bad
    sample of the first bad source (`ids[row]`, or the row number)."""
    if raw.ndim != 2 or raw.shape[1] != len(names):
        raise RewardError(f"reward: scores of shape {tuple(raw.shape)}, need (samples, {len(names)} sources)")
    for i, name in enumerate(names):
        bad = (~torch.isfinite(raw[:, i])).nonzero()
        if len(bad):
            row = int(bad[0])
            sample = ids[row] if ids is not None else str(row)
            raise RewardError(
                f"reward source {name}: sample {sample} (row {row}) scored {raw[row, i].item()}, not a finite number"
            )


def normalized(scores: torch.Tensor, source: RewardSourceBase) -> torch.Tensor:
    """(B,) one source's scores as its `normalize` says (see the module docstring)."""
    if source.normalize == "clip":
        return scores.clamp(-source.clip, source.clip)
    if source.normalize == "whiten":
        std = scores.std(correction=0) if len(scores) > 1 else scores.new_tensor(0.0)
        return (scores - scores.mean()) / std.clamp_min(STD_FLOOR)
    return scores


def combine(raw: torch.Tensor, reward: RewardConfig, ids: list[str] | None = None) -> CombinedReward:
    """The reward of each sample from (B, S) raw per-source scores, columns in reward.sources order;
    RewardError naming the source and sample when a score is not a finite number."""
    sources = reward_sources(reward)
    names = [source_name(s) for s in sources]
    check_sources(raw, names, ids)
    raw = raw.float()
    total = torch.zeros(raw.shape[0])
    for i, source in enumerate(sources):
        total += source.weight * normalized(raw[:, i], source)
    if reward.clip is not None:
        total = total.clamp(-reward.clip, reward.clip)
    means = raw.mean(0).tolist()
    return CombinedReward(total, {f"reward/{name}_mean": mean for name, mean in zip(names, means, strict=True)})
