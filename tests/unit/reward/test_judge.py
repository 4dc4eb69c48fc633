"""The judge reward source (keel/reward/judge.py) on the tiny causal LM: the prompts are built from
the principles, the score is the log-prob difference of the two answers computed by hand, a batch
scores as one sample at a time, and what cannot work is refused naming the field."""

from __future__ import annotations

import pytest
import torch
import yaml

from keel.config import RewardConfig, RewardJudgeSource, parse_config
from keel.constitution import load_constitution
from keel.reward.judge import JudgeScorer, judge_prompts
from keel.reward.model import RewardError, RewardModel, source_problems

PRINCIPLES = {
    "principles": [
        {"name": "short", "critique": "c1", "revision": "r1", "question": "is it short? yes or no."},
        {"name": "right", "critique": "c2", "revision": "r2", "question": "is the sum right? yes or no."},
    ]
}
PROMPTS = ["3+4=", "what is one plus two?", "say hello", "2+2="]
RESPONSES = ["7", " three, the answer is three", "hello world", ""]


@pytest.fixture
def constitution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(PRINCIPLES))
    return path


def _source(model, constitution, **kw) -> RewardJudgeSource:
    return RewardJudgeSource(model=str(model), constitution=str(constitution), positive=" yes", negative=" no", **kw)


def test_the_judge_prompts_are_built_from_the_principles(constitution):
    principles = load_constitution(constitution).principles
    texts = judge_prompts(principles, RewardJudgeSource.model_fields["template"].default, ["3+4="], ["7"])
    assert texts == [
        "3+4=7\n\nQuestion: is it short? yes or no.\nAnswer:",
        "3+4=7\n\nQuestion: is the sum right? yes or no.\nAnswer:",
    ]
    custom = judge_prompts(principles, "[{principle}] {prompt}|{response}|{question}", ["p"], ["r"])
    assert custom == ["[short] p|r|is it short? yes or no.", "[right] p|r|is the sum right? yes or no."]


def test_the_score_is_the_mean_log_prob_difference_of_the_answers(tiny_model_dir, constitution):
    from transformers import AutoModelForCausalLM

    from keel.models.loading import load_tokenizer

    scorer = JudgeScorer(_source(tiny_model_dir, constitution))
    scores = scorer(PROMPTS, RESPONSES)

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    yes, no = tok(" yes", add_special_tokens=False).input_ids, tok(" no", add_special_tokens=False).input_ids
    assert len(yes) == len(no) == 1
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        diffs = []
        for p in PRINCIPLES["principles"]:
            text = f"{prompt}{response}\n\nQuestion: {p['question']}\nAnswer:"
            with torch.no_grad():
                logits = model(torch.tensor([tok(text).input_ids])).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            diffs.append((lp[yes[0]] - lp[no[0]]).item())
        expected.append(sum(diffs) / len(diffs))
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in expected)) > 1  # the samples are told apart

    one = JudgeScorer(_source(tiny_model_dir, constitution, principles=["right"]))(PROMPTS, RESPONSES)
    assert one.shape == (4,) and not torch.allclose(one, scores)


def test_a_batch_scores_as_one_sample_at_a_time(tiny_model_dir, constitution):
    batched = JudgeScorer(_source(tiny_model_dir, constitution, batch_size=8))(PROMPTS, RESPONSES)
    single = JudgeScorer(_source(tiny_model_dir, constitution, batch_size=1))(PROMPTS, RESPONSES)
    odd = JudgeScorer(_source(tiny_model_dir, constitution, batch_size=3))(PROMPTS, RESPONSES)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(odd, single, atol=1e-5, rtol=0)


def test_a_judge_is_one_of_reward_sources(tiny_model_dir, constitution):
    from keel.reward.combine import combine

    cfg = RewardConfig(
        sources=[
            _source(tiny_model_dir, constitution, weight=0.5),
            {"type": "function", "function": "keel.reward.rules:length_penalty"},
        ]
    )
    raw = RewardModel(cfg).score_sources(PROMPTS, RESPONSES)
    assert raw.shape == (4, 2)
    judged = JudgeScorer(_source(tiny_model_dir, constitution))(PROMPTS, RESPONSES)
    torch.testing.assert_close(raw[:, 0], judged)
    combined = combine(raw, cfg)
    assert set(combined.metrics) == {"reward/judge_mean", "reward/length_penalty_mean"}
    torch.testing.assert_close(combined.scores, 0.5 * raw[:, 0] + raw[:, 1])


def test_what_cannot_work_is_refused_naming_the_field(tiny_model_dir, constitution, tmp_path):
    # " Yes" is three tokens for the tiny tokenizer: refused, not scored by its first token
    with pytest.raises(RewardError, match=r"reward.source.positive: ' Yes' is 3 tokens .* it must be exactly one"):
        JudgeScorer(_source(tiny_model_dir, constitution).model_copy(update={"positive": " Yes"}))
    reward = RewardConfig(
        sources=[
            _source(tiny_model_dir, tmp_path / "missing.yaml"),
            _source(tiny_model_dir, constitution, name="j2", principles=["short", "kind"]),
            _source(tmp_path / "nomodel", constitution, name="j3"),
            _source(tiny_model_dir, constitution, name="j4").model_copy(update={"negative": " No"}),
        ]
    )
    problems = source_problems(reward)
    assert (
        problems[0]
        == f"reward.sources[0].constitution: {tmp_path / 'missing.yaml'}: cannot read file: No such file or directory"
    )
    assert problems[1].startswith("reward.sources[1].principles: no principle named 'kind'")
    assert problems[2] == f"reward.sources[2].model: {tmp_path / 'nomodel'} does not exist"
    assert problems[3].startswith("reward.sources[3].negative: ' No' is 3 tokens")
    assert len(problems) == 4


@pytest.mark.parametrize(
    "source, expected",
    [
        ({"template": "{prompt} {answer}"}, "reward.source.template: unknown placeholder {answer}"),
        ({"positive": " no"}, "reward.source: positive and negative are both ' no'"),
        ({"batch_size": 0}, "reward.source.batch_size: Input should be greater than or equal to 1"),
        ({"constitution": None}, "reward.source.constitution"),
    ],
)
def test_a_bad_judge_field_is_a_config_error(source, expected):
    from keel.config import ConfigError

    base = {"type": "judge", "model": "m", "constitution": "c.yaml", "negative": " no"} | source
    base = {k: v for k, v in base.items() if v is not None}
    data = {"model": {"policy": "p"}, "data": {"prompts": "x.jsonl"}, "reward": {"source": base}}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert expected in str(err.value), str(err.value)
