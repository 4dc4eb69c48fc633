import pytest

from keel.reward.rules import arithmetic


def test_arithmetic_reward():
    prompts = ["3+4="] * 5
    responses = ["7", " 7 and then", "8", "seven", ""]
    meta = [{"answer": "7"}] * 5
    assert arithmetic(prompts, responses, meta) == [1.0, 1.0, 0.1, 0.0, 0.0]


def test_arithmetic_negative_answers():
    assert arithmetic(["2-5="], ["-3"], [{"answer": "-3"}]) == [1.0]


def test_arithmetic_names_the_sample_missing_its_answer():
    with pytest.raises(ValueError, match="sample 1: arithmetic reward needs metadata field 'answer'"):
        arithmetic(["a", "b"], ["1", "2"], [{"answer": "1"}, {}])
