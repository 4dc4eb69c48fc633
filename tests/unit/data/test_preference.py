"""Preference pairs: texts for the reward model, tokens for DPO, margins, overlong rows."""

from __future__ import annotations

import json

import pytest

from keel.config import PreferenceDataConfig
from keel.data.preference import build_pairs
from keel.data.rows import DataError, Row
from keel.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_pair_holds_texts_tokens_and_margin(tok):
    cfg = PreferenceDataConfig(path="x", chosen_field="good", rejected_field="bad", margin_field="m")
    rows = [Row("f:1", {"prompt": "3+4=", "good": "7", "bad": "cat", "m": 2})]
    [pair] = build_pairs(rows, cfg, tok).pairs
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ("3+4=", "7", "cat", 2.0)
    assert tok.decode(pair.chosen_ids) == "7</s>" and tok.decode(pair.rejected_ids) == "cat</s>"
    assert pair.prompt_ids == tuple(tok("3+4=").input_ids)


def test_chat_template_wraps_the_prompt(tok):
    cfg = PreferenceDataConfig(path="x", apply_chat_template=True)
    [pair] = build_pairs([Row("f:1", {"prompt": "3+4=", "chosen": "7", "rejected": "8"})], cfg, tok).pairs
    assert pair.prompt == "<|user|>3+4=\n<|assistant|>"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen and rejected are the same text"),
        ({"prompt": "p", "chosen": 3, "rejected": "a"}, "field 'chosen' must be a string, got int"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "m": "x"}, "field 'm' must be a number"),
    ],
)
def test_bad_pairs_name_the_row(tok, fields, message):
    cfg = PreferenceDataConfig(path="x", margin_field="m" if "m" in fields else None)
    with pytest.raises(DataError, match=rf"^f:3: {message}"):
        build_pairs([Row("f:3", fields)], cfg, tok)


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_margin_is_refused_naming_the_row(tok, tmp_path, margin):
    from keel.data.rows import read_rows

    path = tmp_path / "pairs.jsonl"
    pair = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    path.write_text(json.dumps({**pair, "m": 1.0}) + "\n" + json.dumps({**pair, "m": margin}) + "\n")  # NaN, Infinity
    cfg = PreferenceDataConfig(path=str(path), margin_field="m")
    with pytest.raises(DataError, match=rf"^{path}:2: field 'm' must be a finite number, got {margin}$"):
        build_pairs(read_rows(str(path)), cfg, tok)


def test_overlong_pairs(tok):
    rows = [Row("f:1", {"prompt": "1+1=", "chosen": "2", "rejected": "3" * 20})]
    cut = build_pairs(rows, PreferenceDataConfig(path="x", max_tokens=10, overlong="truncate"), tok)
    assert cut.truncated == 1 and len(cut.pairs[0].prompt_ids) + len(cut.pairs[0].rejected_ids) == 10
    assert cut.pairs[0].rejected == "3" * 6  # the text the reward model sees is cut the same way
    assert build_pairs(rows, PreferenceDataConfig(path="x", max_tokens=10), tok).dropped == 1
    with pytest.raises(DataError, match="f:1: 25 tokens, limit is data.max_tokens 10"):
        build_pairs(rows, PreferenceDataConfig(path="x", max_tokens=10, overlong="error"), tok)
