"""SFT examples: the loss mask covers the response (assistant turns) only; overlong rows follow the
policy; packing keeps examples apart."""

from __future__ import annotations

import pytest
import torch

from keel.config import SFTDataConfig
from keel.data.rows import DataError, Row
from keel.data.sft import build_sft_examples, collate, pack
from keel.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _trained_text(tok, ex):
    return tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])


def test_prompt_response_trains_the_response_and_eos(tok):
    cfg = SFTDataConfig(path="x")
    rows = [Row("f:1", {"prompt": "3+4=", "response": "7"}), Row("f:2", {"prompt": "1+1=", "response": "2 yes"})]
    built = build_sft_examples(rows, cfg, tok)
    ex = built.examples[0]
    assert tok.decode(ex.input_ids) == "3+4=7</s>"
    assert _trained_text(tok, ex) == "7</s>"
    assert _trained_text(tok, built.examples[1]) == "2 yes</s>"
    assert ex.input_ids[: len(tok("3+4=").input_ids)] == tuple(tok("3+4=").input_ids)  # as PPO encodes it


def test_messages_train_assistant_turns_only(tok):
    cfg = SFTDataConfig(path="x", style="messages")
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "3+4="},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "and 1+1="},
        {"role": "assistant", "content": "2"},
    ]
    [ex] = build_sft_examples([Row("f:1", {"messages": conversation})], cfg, tok).examples
    # the template renders "<|role|>content\n" per turn; the replies, their newline and a final EOS train
    assert tok.decode(ex.input_ids).startswith("<|system|>be brief\n<|user|>3+4=\n<|assistant|>7\n")
    assert _trained_text(tok, ex) == "7\n2\n</s>"
    assert ex.input_ids[-1] == tok.eos_token_id


def test_messages_without_a_chat_template_use_a_plain_format(tok):
    plain = load_tokenizer(tok.name_or_path)
    plain.chat_template = None
    cfg = SFTDataConfig(path="x", style="messages")
    msgs = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    [ex] = build_sft_examples([Row("f:1", {"messages": msgs})], cfg, plain).examples
    assert plain.decode(ex.input_ids) == "user: 3+4=\nassistant: 7\n</s>"
    assert _trained_text(plain, ex) == "7\n</s>"


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "must be a non-empty list of messages"),
        ([{"role": "user", "content": "hi"}], "has no assistant message to train on"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\] must be \{role: system\|user\|assistant"),
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "is an assistant turn"),
    ],
)
def test_bad_conversations_name_the_row(tok, messages, message):
    cfg = SFTDataConfig(path="x", style="messages")
    with pytest.raises(DataError, match=rf"^f:7: .*{message}"):
        build_sft_examples([Row("f:7", {"messages": messages})], cfg, tok)


def test_overlong_rows_truncate_drop_or_fail_and_are_counted(tok):
    rows = [Row("f:1", {"prompt": "1+1=", "response": "2"}), Row("f:2", {"prompt": "9+9=", "response": "1" * 30})]
    truncated = build_sft_examples(rows, SFTDataConfig(path="x", max_tokens=12, overlong="truncate"), tok)
    assert (truncated.truncated, truncated.dropped) == (1, 0) and len(truncated.examples[1]) == 12
    dropped = build_sft_examples(rows, SFTDataConfig(path="x", max_tokens=12, overlong="drop"), tok)
    assert (dropped.truncated, dropped.dropped, len(dropped.examples)) == (0, 1, 1)
    with pytest.raises(DataError, match=r"^f:2: 35 tokens, limit is data.max_tokens 12"):
        build_sft_examples(rows, SFTDataConfig(path="x", max_tokens=12, overlong="error"), tok)


def test_packing_keeps_examples_apart(tok, tiny_model_dir):
    """A packed example's logits equal its logits alone: positions restart and, with no attention
    mask, transformers builds a block-diagonal mask."""
    from keel.learner.sft import sft_logits
    from keel.models.loading import load_causal_lm

    cfg = SFTDataConfig(path="x")
    rows = [Row(f"f:{i}", {"prompt": p, "response": r}) for i, (p, r) in enumerate([("3+4=", "7"), ("12+30=", "42")])]
    examples = build_sft_examples(rows, cfg, tok).examples
    [packed] = pack(examples, max_tokens=64)
    assert len(packed) == len(examples[0]) + len(examples[1])
    assert packed.position_ids == tuple(range(len(examples[0]))) + tuple(range(len(examples[1])))
    model = load_causal_lm(str(tiny_model_dir)).eval()
    with torch.no_grad():
        batch = collate([packed], tok.pad_token_id)
        together = sft_logits(model, batch)[0]
        alone = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
    second = together[len(examples[0]) :]
    assert torch.allclose(second, alone, atol=1e-5), (second - alone).abs().max()
    # and the batch layout the trainer uses: right padding, loss mask aligned with input ids
    batch = collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(e) for e in examples))
    assert batch["loss_mask"][0].sum() == sum(examples[0].loss_mask)
    assert (batch["input_ids"][0, len(examples[0]) :] == tok.pad_token_id).all()
