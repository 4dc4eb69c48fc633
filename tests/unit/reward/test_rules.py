import pytest

from keel.reward.rules import arithmetic, length_penalty


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


def test_length_penalty_is_minus_the_share_of_max_chars():
    responses = ["", "7", "12345678", "1234567890 and more"]
    assert length_penalty([""] * 4, responses, [{}] * 4) == [0.0, -0.125, -1.0, -1.0]
    assert length_penalty(["a"], ["12"], [{}], max_chars=4) == [-0.5]
    with pytest.raises(ValueError, match="max_chars must be >= 1"):
        length_penalty(["a"], ["12"], [{}], max_chars=0)
