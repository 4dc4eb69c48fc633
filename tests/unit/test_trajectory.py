import pytest
import torch

from keel.trajectory import Trajectories, position_ids


def _traj(P, R, lengths, version=0, prefix="a"):
    B = len(lengths)
    rm = torch.arange(R).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return Trajectories(
        rollout_id=prefix,
        weight_version=version,
        prompt_ids=[f"{prefix}{i}" for i in range(B)],
        sample_index=[0] * B,
        prompt_tokens=torch.arange(B * P).view(B, P) + 10,
        prompt_mask=torch.ones(B, P, dtype=torch.bool),
        response_tokens=torch.arange(B * R).view(B, R) + 100,
        response_mask=rm,
        behaviour_logprobs=-torch.rand(B, R) * rm,
        prompts=["p"] * B,
        responses=["r"] * B,
    )


def test_validate_names_the_bad_field():
    t = _traj(3, 4, [4, 2])
    with pytest.raises(ValueError, match=r"trajectories.scores: shape \(3,\), expected \(2,\)"):
        t.with_fields(scores=torch.zeros(3))
    with pytest.raises(ValueError, match="trajectories.prompts: 1 entries for 2 samples"):
        t.with_fields(prompts=["x"])


def test_concat_repads_and_refuses_mixed_versions():
    a, b = _traj(2, 3, [3, 1], prefix="a"), _traj(4, 5, [5], prefix="b")
    c = Trajectories.concat([a, b], pad_token_id=0)
    assert c.prompt_tokens.shape == (3, 4) and c.response_tokens.shape == (3, 5)
    assert c.prompt_mask[:2].tolist() == [[False, False, True, True]] * 2  # left padding
    assert c.response_tokens[0, 3:].tolist() == [0, 0]  # right padding
    assert c.prompt_ids == ["a0", "a1", "b0"]
    with pytest.raises(ValueError, match=r"weight versions \[0, 1\]"):
        Trajectories.concat([a, _traj(2, 3, [1], version=1)], pad_token_id=0)


def test_select_and_group_index():
    t = _traj(2, 3, [3, 2, 1]).with_fields(scores=torch.tensor([1.0, 2.0, 3.0]))
    s = t.select([2, 0])
    assert s.prompt_ids == ["a2", "a0"] and s.scores.tolist() == [3.0, 1.0]
    t2 = t.with_fields(prompt_ids=["x", "y", "x"])
    assert t2.group_index.tolist() == [0, 1, 0]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
