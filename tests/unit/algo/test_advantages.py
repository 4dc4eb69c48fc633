import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keel.algo.advantages import ESTIMATORS, AdvantageInputs, compute_advantages, group_mean_std
from keel.algo.masked import masked_mean, masked_var
from unit.algo.strategies import assert_values


def _inputs(scores, n_tokens=3, groups=None, kl=None, values=None):
    B = len(scores)
    return AdvantageInputs(
        scores=torch.tensor(scores, dtype=torch.float64),
        mask=torch.ones(B, n_tokens, dtype=torch.float64),
        kl_penalty=kl,
        values=values,
        group_index=torch.tensor(groups) if groups is not None else None,
    )


def test_grpo_hand_case():
    inp = _inputs([1.0, 0.0, 0.0, 0.0, 2.0, 4.0], groups=[0, 0, 0, 0, 1, 1])
    adv, ret = compute_advantages("grpo", inp)
    std0 = statistics.stdev([1, 0, 0, 0])
    assert adv[:4, 0].tolist() == pytest.approx([0.75 / std0, -0.25 / std0, -0.25 / std0, -0.25 / std0], rel=1e-5)
    s1 = statistics.stdev([2, 4])
    assert adv[4:, 0].tolist() == pytest.approx([-1 / s1, 1 / s1], rel=1e-5)
    assert (adv[:, 0:1] == adv).all()  # broadcast over the sequence
    assert ret[:, -1].tolist() == pytest.approx([1, 0, 0, 0, 2, 4])


def test_grpo_groups_need_not_be_contiguous_and_singletons_get_zero():
    inp = _inputs([1.0, 5.0, 3.0, 7.0], groups=[0, 1, 0, 2])
    adv, _ = compute_advantages("grpo", inp)
    assert adv[1].abs().max() == 0 and adv[3].abs().max() == 0
    assert adv[0, 0] < 0 < adv[2, 0]


def test_grpo_identical_scores_give_zero_not_nan():
    adv, _ = compute_advantages("grpo", _inputs([1.0, 1.0, 1.0], groups=[0, 0, 0]))
    assert torch.isfinite(adv).all() and adv.abs().max() == 0


def test_dr_grpo_does_not_divide_by_std():
    adv, _ = compute_advantages("dr_grpo", _inputs([1.0, 0.0, 2.0, 4.0], groups=[0, 0, 1, 1]))
    assert adv[:, 0].tolist() == pytest.approx([0.5, -0.5, -1.0, 1.0])


def test_rloo_is_leave_one_out():
    scores = [1.0, 2.0, 6.0]
    adv, _ = compute_advantages("rloo", _inputs(scores, groups=[0, 0, 0]))
    want = [s - (sum(scores) - s) / 2 for s in scores]
    assert adv[:, 0].tolist() == pytest.approx(want)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_rloo_matches_slow_loop(n, groups, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n * groups, generator=g, dtype=torch.float64)
    index = torch.arange(groups).repeat_interleave(n)
    adv, _ = compute_advantages(
        "rloo", AdvantageInputs(scores, torch.ones(n * groups, 2, dtype=torch.float64), group_index=index)
    )
    for i in range(n * groups):
        others = [scores[j].item() for j in range(n * groups) if index[j] == index[i] and j != i]
        assert adv[i, 0].item() == pytest.approx(scores[i].item() - sum(others) / len(others))


def test_group_mean_std_matches_statistics():
    scores = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0], dtype=torch.float64)
    idx = torch.tensor([7, 7, 2, 2, 2])
    mean, std, size = group_mean_std(scores, idx)
    assert mean.tolist() == pytest.approx([2, 2, 10 / 3, 10 / 3, 10 / 3])
    assert std[0].item() == pytest.approx(statistics.stdev([3, 1]))
    assert std[2].item() == pytest.approx(statistics.stdev([4, 1, 5]))
    assert size.tolist() == [2, 2, 3, 3, 3]


def test_kl_in_reward_counts_in_outcome_estimators():
    kl = torch.tensor([[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    adv, ret = compute_advantages("dr_grpo", _inputs([1.0, 1.0], groups=[0, 0], kl=kl))
    assert ret[:, 0].tolist() == pytest.approx([0.0, 1.0])  # 1 - 0.5 - 0.5
    # equal scores: the score term is 0; each token keeps the KL penalty still ahead of it
    assert_values(adv, [[-1.0, -0.5, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_add_kl_after_normalising_scores(name):
    """Four equal scores with KL penalties of -1e-3..-4e-3 on one token each: the advantages are of
    the KL's own scale. Standardising score + KL inside the group (the old rule) made +-1.16 of them."""
    kl = torch.zeros(4, 3, dtype=torch.float64)
    kl[:, 0] = torch.tensor([-1e-3, -2e-3, -3e-3, -4e-3], dtype=torch.float64)
    adv, _ = compute_advantages(name, _inputs([1.0, 1.0, 1.0, 1.0], groups=[0, 0, 0, 0], kl=kl))
    assert_values(adv[:, 0], [-1e-3, -2e-3, -3e-3, -4e-3])
    assert torch.all(adv[:, 1:] == 0)
    # different scores: the score term is the group-normalised score alone, the KL rides on top
    scores = [0.0, 1.0, 0.0, 1.0]
    plain, _ = compute_advantages(name, _inputs(scores, groups=[0, 0, 0, 0]))
    with_kl, _ = compute_advantages(name, _inputs(scores, groups=[0, 0, 0, 0], kl=kl))
    assert_values(with_kl - plain, kl.tolist())


def test_reinforce_pp_is_whitened_discounted_return():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    inp = AdvantageInputs(scores=torch.tensor([1.0, -1.0], dtype=torch.float64), mask=mask)
    adv, ret = compute_advantages("reinforce_pp", inp, gamma=0.5)
    assert_values(ret, [[0.25, 0.5, 1.0], [-0.5, -1.0, 0.0]])
    assert masked_mean(adv, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(adv, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert adv[1, 2] == 0


def test_reinforce_pp_baseline_subtracts_group_mean_before_whitening():
    mask = torch.ones(4, 2, dtype=torch.float64)
    # Group 0 scores {10, 12}, group 1 {0, 2}: after the group baseline both groups look alike.
    inp = AdvantageInputs(
        scores=torch.tensor([10.0, 12.0, 0.0, 2.0], dtype=torch.float64),
        mask=mask,
        group_index=torch.tensor([0, 0, 1, 1]),
    )
    adv, ret = compute_advantages("reinforce_pp_baseline", inp)
    assert ret[:, -1].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])
    assert adv[0, 0] == pytest.approx(adv[2, 0].item()) and adv[0, 0] < 0 < adv[1, 0]


def test_gae_estimator_uses_values_and_kl():
    mask = torch.ones(1, 2, dtype=torch.float64)
    values = torch.tensor([[0.2, 0.4]], dtype=torch.float64)
    kl = torch.tensor([[-0.1, -0.1]], dtype=torch.float64)
    inp = AdvantageInputs(scores=torch.tensor([1.0], dtype=torch.float64), mask=mask, kl_penalty=kl, values=values)
    adv, ret = compute_advantages("gae", inp, gamma=1.0, lam=1.0)
    # rewards [-0.1, 0.9]: A1 = 0.9 - 0.4 = 0.5 ; A0 = -0.1 + 0.4 - 0.2 + 0.5 = 0.6
    assert_values(adv, [[0.6, 0.5]])
    assert_values(ret, [[0.8, 0.9]])


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="gae needs critic values"):
        compute_advantages("gae", _inputs([1.0]))
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        with pytest.raises(ValueError, match=f"{name} needs group_index"):
            compute_advantages(name, _inputs([1.0, 2.0]))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo2'"):
        compute_advantages("ppo2", _inputs([1.0]))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_zeroes_masked_positions_and_ranks_better_samples_higher(name):
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    scores = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    inp = AdvantageInputs(
        scores=scores,
        mask=mask,
        values=torch.zeros(4, 4, dtype=torch.float64),
        group_index=torch.tensor([0, 0, 1, 1]),
        kl_penalty=torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.0,
    )
    adv, ret = compute_advantages(name, inp, gamma=1.0, lam=1.0)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)
    # within each prompt, the sample with reward 1 gets the higher first-token advantage
    assert adv[1, 0] > adv[0, 0] and adv[3, 0] > adv[2, 0]
