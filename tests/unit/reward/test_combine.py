"""Several reward sources into one reward per sample: weights, per-source whitening (over the whole
batch) and clipping, reward.clip on the sum, the per-source means, and a bad score named by source
and sample. Against a slow loop over samples written from the formula."""

from __future__ import annotations

import math

import pytest
import torch

from keel.config import RewardConfig, RewardFunctionSource, RewardServerSource
from keel.controller.replicas import shard_rows
from keel.reward.combine import STD_FLOOR, combine
from keel.reward.model import RewardError


def _source(function: str, **kw) -> RewardFunctionSource:
    return RewardFunctionSource(function=f"keel.reward.rules:{function}", **kw)


def _slow(raw: list[list[float]], reward: RewardConfig) -> list[float]:
    """r_b = clip(sum_i w_i * normalize_i(raw[b][i])), one sample and one source at a time."""
    B = len(raw)
    out = []
    for b in range(B):
        total = 0.0
        for i, s in enumerate(reward.sources):
            x = raw[b][i]
            if s.normalize == "clip":
                x = min(max(x, -s.clip), s.clip)
            elif s.normalize == "whiten":
                col = [raw[k][i] for k in range(B)]
                mean = sum(col) / B
                std = math.sqrt(sum((c - mean) ** 2 for c in col) / B)
                x = (x - mean) / max(std, STD_FLOOR)
            total += s.weight * x
        if reward.clip is not None:
            total = min(max(total, -reward.clip), reward.clip)
        out.append(total)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("total_clip", [None, 1.5])
def test_combination_equals_the_formula_sample_by_sample(seed, total_clip):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(9, 3, generator=g) * torch.tensor([1.0, 4.0, 0.3]) + torch.tensor([0.5, -2.0, 7.0])
    reward = RewardConfig(
        sources=[
            _source("arithmetic", weight=2.0),
            _source("length_penalty", weight=-0.5, normalize="whiten"),
            RewardServerSource(address="127.0.0.1:1", weight=0.25, normalize="clip", clip=7.1),
        ],
        clip=total_clip,
    )
    combined = combine(raw, reward)
    assert combined.scores.shape == (9,) and combined.scores.dtype == torch.float32
    torch.testing.assert_close(combined.scores, torch.tensor(_slow(raw.tolist(), reward)), atol=1e-5, rtol=1e-5)
    # the metrics: each source's raw mean, whatever its weight and normalisation
    means = raw.mean(0).tolist()
    assert combined.metrics == pytest.approx(
        {"reward/arithmetic_mean": means[0], "reward/length_penalty_mean": means[1], "reward/server_mean": means[2]}
    )


def test_whitening_is_per_source_and_over_the_whole_batch():
    raw = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 60.0], [6.0, 30.0]])
    reward = RewardConfig(sources=[_source("arithmetic", normalize="whiten"), _source("length_penalty")])
    scores = combine(raw, reward).scores
    whitened = scores - raw[:, 1]  # the second source is raw, weight 1
    assert whitened.mean().abs() < 1e-6 and (whitened.std(correction=0) - 1).abs() < 1e-5
    # shards whitened on their own (what the reward actors would do) give another answer: the
    # combination has to run once, after the join
    shards = torch.cat([combine(raw[list(r)], reward).scores for r in shard_rows(4, 2)])
    assert not torch.allclose(shards, scores)


def test_a_constant_source_whitens_to_zero_not_to_noise():
    raw = torch.tensor([[0.5, 1.0], [0.5 + 1e-7, 0.0], [0.5, 1.0]])
    reward = RewardConfig(sources=[_source("arithmetic", normalize="whiten"), _source("length_penalty", weight=0.0)])
    assert combine(raw, reward).scores.abs().max() < 0.1  # std ~6e-8 is floored at 1e-6 (unfloored: up to 1.4)
    one = combine(raw[:1], reward).scores  # a batch of one: nothing to whiten against
    assert one.tolist() == [0.0]


def test_a_single_source_is_its_scores_clipped_as_before():
    raw = torch.tensor([[0.25], [-3.0], [0.1]])
    reward = RewardConfig(source=_source("arithmetic"), clip=1.0)
    combined = combine(raw, reward)
    assert combined.scores.tolist() == [0.25, -1.0, pytest.approx(0.1)]
    assert torch.equal(combine(raw, RewardConfig(source=_source("arithmetic"))).scores, raw[:, 0])  # bit for bit
    assert combined.metrics == {"reward/arithmetic_mean": pytest.approx(raw.mean().item())}


def test_zero_weight_is_watched_not_trained_on():
    raw = torch.tensor([[1.0, -0.75], [0.0, -0.25]])
    reward = RewardConfig(sources=[_source("arithmetic"), _source("length_penalty", weight=0.0)])
    combined = combine(raw, reward)
    assert combined.scores.tolist() == [1.0, 0.0]
    assert combined.metrics["reward/length_penalty_mean"] == -0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_score_names_the_source_and_the_sample(bad):
    raw = torch.tensor([[1.0, 0.0], [1.0, bad], [0.0, 0.0]])
    reward = RewardConfig(sources=[_source("arithmetic"), _source("length_penalty", name="length")])
    with pytest.raises(RewardError, match=r"reward source length: sample p1/0 \(row 1\) scored -?(nan|inf)"):
        combine(raw, reward, ids=["p0/0", "p1/0", "p2/0"])
    with pytest.raises(RewardError, match=r"reward source length: sample 1 \(row 1\)"):
        combine(raw, reward)  # no ids: the row number


def test_scores_of_another_shape_are_refused():
    reward = RewardConfig(sources=[_source("arithmetic"), _source("length_penalty")])
    with pytest.raises(RewardError, match=r"scores of shape \(3, 1\), need \(samples, 2 sources\)"):
        combine(torch.zeros(3, 1), reward)
