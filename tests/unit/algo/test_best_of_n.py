"""Best-of-n selection and the best-of-k curve, against slow loops over every subset."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.algo.best_of_n import best_of_first_k, best_of_k_unbiased, keep_mask, ladder, pick_best


def slow_best_of_k(scores: list[float], values: list[float], k: int) -> tuple[float, float]:
    """Every k-subset: the mean value of its top-scored samples (a random tie-break), averaged."""
    total_value = total_score = 0.0
    subsets = list(itertools.combinations(range(len(scores)), k))
    for subset in subsets:
        top = max(scores[i] for i in subset)
        at_top = [i for i in subset if scores[i] == top]
        total_value += sum(values[i] for i in at_top) / len(at_top)
        total_score += top
    return total_value / len(subsets), total_score / len(subsets)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda prompts: st.integers(1, 7).flatmap(
            lambda n: st.tuples(
                st.lists(st.lists(st.integers(0, 3), min_size=n, max_size=n), min_size=prompts, max_size=prompts),
                st.lists(st.lists(st.integers(0, 1), min_size=n, max_size=n), min_size=prompts, max_size=prompts),
                st.integers(1, n),
            )
        )
    )
)
def test_unbiased_best_of_k_equals_the_mean_over_every_subset(case):
    scores, values, k = case  # small integer scores: ties are common
    value, score = best_of_k_unbiased(torch.tensor(scores, dtype=torch.float32), torch.tensor(values), k)
    for p in range(len(scores)):
        want_value, want_score = slow_best_of_k(scores[p], values[p], k)
        assert value[p].item() == pytest.approx(want_value, abs=1e-12)
        assert score[p].item() == pytest.approx(want_score, abs=1e-12)


def test_best_of_k_ends():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    values = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    one, _ = best_of_k_unbiased(scores, values, 1)
    torch.testing.assert_close(one, values.double().mean(-1))  # k = 1: a random sample
    top, top_score = best_of_k_unbiased(scores, values, 4)
    assert top.tolist() == [0.5, 0.0] and top_score.tolist() == pytest.approx([0.9, 0.3])  # the tie 0.9 split


def test_best_of_first_k_reads_the_first_k_and_breaks_ties_to_the_first():
    scores = torch.tensor([[0.2, 0.7, 0.7, 0.9], [1.0, 1.0, 0.0, 2.0]])
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]])
    assert [best_of_first_k(scores, values, k)[0].tolist() for k in (1, 2, 3, 4)] == [
        [10.0, 20.0],
        [11.0, 20.0],
        [11.0, 20.0],  # 0.7 twice: the first one
        [13.0, 23.0],
    ]
    assert best_of_first_k(scores, values, 4)[1].tolist() == pytest.approx([0.9, 2.0])


def test_the_first_k_curve_only_rises_in_score():
    g = torch.Generator().manual_seed(0)
    scores, values = torch.rand(50, 8, generator=g), torch.rand(50, 8, generator=g)
    means = [best_of_first_k(scores, values, k)[1].mean().item() for k in ladder(8)]
    assert means == sorted(means)
    unbiased = [best_of_k_unbiased(scores, values, k)[1].mean().item() for k in ladder(8)]
    assert unbiased == sorted(unbiased)


def test_ladder():
    assert ladder(1) == [1] and ladder(2) == [1, 2] and ladder(8) == [1, 2, 4, 8]
    assert ladder(6) == [1, 2, 4, 6] and ladder(9) == [1, 2, 4, 8, 9]


def test_pick_best_ties_go_to_the_first_and_nothing_eligible_is_minus_one():
    scores = torch.tensor([[0.5, 0.9, 0.9], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    eligible = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    assert pick_best(scores).tolist() == [1, 2, 0]
    assert pick_best(scores, eligible).tolist() == [1, 1, -1]


def test_keep_best_is_one_per_prompt_and_threshold_keeps_every_sample_at_or_above_it():
    scores = torch.tensor([[0.5, 0.9, 0.9], [0.1, 0.2, 0.3], [0.4, 0.6, 0.8]])
    eligible = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    best = keep_mask(scores, "best", eligible=eligible)
    assert best.tolist() == [[False, True, False], [False, False, True], [False, True, False]]
    kept = keep_mask(scores, "threshold", 0.5, eligible)
    assert kept.tolist() == [[True, True, True], [False, False, False], [False, True, False]]
    with pytest.raises(ValueError, match="needs a threshold"):
        keep_mask(scores, "threshold")


def test_combinations_stay_exact_at_large_n():
    n = 64
    scores = torch.arange(n, dtype=torch.float32).unsqueeze(0)  # sample j is the j-th best from the bottom
    values = torch.zeros(1, n)
    values[0, -1] = 1.0  # only the top sample has value
    for k in (1, 8, 32, 64):
        assert best_of_k_unbiased(scores, values, k)[0].item() == pytest.approx(k / n)  # P(top in subset)
    assert math.comb(64, 32) < 2**63  # float64 holds each C(m, k) to 1 part in 2^53
