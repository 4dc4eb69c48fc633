"""The reward core without Ray: functions, HF reward models, and refusing bad scores."""

import math

import pytest
import torch

from keel.config import RewardConfig, RewardFunctionSource, RewardModelSource
from keel.reward.model import RewardError, RewardModel


def nan_reward(prompts, responses, metadata, bad_row=1, value=math.nan):
    return [value if i == bad_row else 1.0 for i in range(len(prompts))]


def short_reward(prompts, responses, metadata):
    return [1.0]


def _fn(name, **kwargs):
    return RewardModel(RewardConfig(source=RewardFunctionSource(function=f"{__name__}:{name}", kwargs=kwargs)))


def test_function_reward_with_kwargs_and_clip():
    rm = RewardModel(RewardConfig(source=RewardFunctionSource(function="keel.reward.rules:arithmetic"), clip=0.5))
    scores = rm.score(["1+1=", "1+1="], ["2", "3"], [{"answer": "2"}, {"answer": "2"}])
    assert scores.tolist() == pytest.approx([0.5, 0.1])
    assert scores.dtype == torch.float32


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1.0", None])
def test_non_finite_or_non_number_score_names_the_sample(value):
    rm = _fn("nan_reward", bad_row=2, value=value)
    with pytest.raises(RewardError, match=r"sample p2 \(row 2\) scored"):
        rm.score(["a"] * 3, ["b"] * 3, None, ids=["p0", "p1", "p2"])


def test_wrong_number_of_scores_is_an_error():
    with pytest.raises(RewardError, match="returned 1 scores for 3 samples"):
        _fn("short_reward").score(["a"] * 3, ["b"] * 3)


def test_bad_function_reference():
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        RewardModel(RewardConfig(source=RewardFunctionSource(function="no_such_module:f")))
    with pytest.raises(RewardError, match="has no callable 'missing'"):
        RewardModel(RewardConfig(source=RewardFunctionSource(function="keel.reward.rules:missing")))


def test_hf_reward_model_scores_batches_consistently(tmp_path):
    from keel.models.tiny import TinyModelSpec, make_tiny_model

    path = make_tiny_model(tmp_path / "rm", TinyModelSpec(num_layers=1), reward=True)
    one = RewardModel(RewardConfig(source=RewardModelSource(path=str(path), batch_size=1)))
    many = RewardModel(RewardConfig(source=RewardModelSource(path=str(path), batch_size=8)))
    prompts, responses = ["1+1=", "3+4=", "the cat"], ["2", "77 and more words", " sat"]
    a, b = one.score(prompts, responses), many.score(prompts, responses)
    assert a.shape == (3,) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # padding does not change a score
    assert len(set(a.tolist())) == 3


def test_several_sources_score_each_column_and_combine():
    correct = RewardFunctionSource(function="keel.reward.rules:arithmetic", name="correct")
    length = RewardFunctionSource(function="keel.reward.rules:length_penalty", weight=0.5, kwargs={"max_chars": 4})
    rm = RewardModel(RewardConfig(sources=[correct, length], clip=1.0))
    prompts, responses, meta = ["1+1="] * 3, ["2", "2222", "x"], [{"answer": "2"}] * 3
    raw = rm.score_sources(prompts, responses, meta)
    torch.testing.assert_close(raw, torch.tensor([[1.0, -0.25], [0.1, -1.0], [0.0, -0.25]]))  # a column per source, raw
    scores = rm.score(prompts, responses, meta)
    assert scores.tolist() == pytest.approx([0.875, -0.4, -0.125])  # 1 * correct + 0.5 * length, clipped to 1
    assert rm.name == "correct + length_penalty" and rm.samples_scored() == 6


def test_a_bad_score_of_one_source_names_the_source_and_the_sample():
    good = RewardFunctionSource(function="keel.reward.rules:length_penalty")
    bad = RewardFunctionSource(function=f"{__name__}:nan_reward", name="flaky", kwargs={"bad_row": 1})
    rm = RewardModel(RewardConfig(sources=[good, bad]))
    with pytest.raises(RewardError, match=rf"reward flaky \({__name__}:nan_reward\): sample q1 \(row 1\) scored nan"):
        rm.score_sources(["a"] * 2, ["b"] * 2, ids=["q0", "q1"])


def test_a_source_that_does_not_import_is_named_by_its_place():
    from keel.reward.model import source_problems

    sources = [
        RewardFunctionSource(function="keel.reward.rules:arithmetic"),
        RewardFunctionSource(function="no_such_module:f"),
        RewardModelSource(path="/no/such/rm"),
    ]
    reward = RewardConfig(sources=sources)
    with pytest.raises(RewardError, match=r"reward.sources\[1\].function: cannot import module 'no_such_module'"):
        RewardModel(reward)
    assert source_problems(reward) == [
        "reward.sources[1].function: cannot import module 'no_such_module' (No module named 'no_such_module')",
        "reward.sources[2].path: /no/such/rm does not exist",
    ]
