"""Supervised fine-tuning examples: token ids with a mask on the tokens the loss trains.

Two row styles:
- prompt_response: the prompt is encoded as PPO encodes it (`encode_prompt`, chat template
  optional), the response follows with EOS, and only the response (and EOS) is trained.
- messages: a list of {role, content}. The conversation is rendered turn by turn with the
  tokenizer's chat template (or a plain "role: content" format when it has none). Each
  assistant turn is trained, with the template's closing text; the rest is context. Segments
  are tokenised one by one, the way generation sees them: the prompt up to the assistant
  header, then the reply.

Rows longer than `max_tokens` are truncated, dropped (both counted) or refused, per config.
`pack` concatenates examples into `max_tokens` sequences with positions restarting per example;
the trainer passes position ids and no attention mask, from which transformers builds a
block-diagonal mask, so packed examples do not attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.config import SFTDataConfig
from keel.data.prompts import encode_prompt
from keel.data.rows import DataError, Row

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TokenExample:
    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]  # True on tokens that are training targets
    position_ids: tuple[int, ...] | None = None  # set by packing; None = 0..L-1

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ExampleSet:
    examples: list[TokenExample]
    truncated: int = 0
    dropped: int = 0


def encode_response(tokenizer, text: str) -> list[int]:
    """A response's tokens as the policy should produce them: the text, then EOS."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def build_sft_examples(rows: list[Row], cfg: SFTDataConfig, tokenizer) -> ExampleSet:
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        if cfg.style == "messages":
            ids, mask = _conversation(row, cfg.messages_field, tokenizer)
        else:
            _, prompt_ids = encode_prompt(tokenizer, row.text(cfg.prompt_field), cfg.apply_chat_template)
            response_ids = encode_response(tokenizer, row.text(cfg.response_field))
            ids, mask = prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)
        if len(ids) > cfg.max_tokens:
            if cfg.overlong == "error":
                raise DataError(f"{row.where}: {len(ids)} tokens, limit is data.max_tokens {cfg.max_tokens}")
            ids, mask = ids[: cfg.max_tokens], mask[: cfg.max_tokens]
            if cfg.overlong == "drop" or not any(mask):
                dropped += 1
                continue
            truncated += 1
        examples.append(TokenExample(tuple(ids), tuple(mask)))
    if cfg.packing:
        examples = pack(examples, cfg.max_tokens)
    return ExampleSet(examples, truncated, dropped)


def _messages(row: Row, field: str) -> list[dict[str, str]]:
    value = row.fields.get(field)
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.where}: field {field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{row.where}: {field}[{i}] must be {{role: {'|'.join(ROLES)}, content: str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{row.where}: field {field!r} has no assistant message to train on")
    if out[0]["role"] == "assistant":
        raise DataError(f"{row.where}: {field}[0] is an assistant turn; a conversation starts with system or user")
    return out


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


def _conversation(row: Row, field: str, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of a conversation, segment by segment."""
    messages = _messages(row, field)
    ids: list[int] = list(tokenizer("", add_special_tokens=True).input_ids)  # BOS, when the tokenizer adds one
    mask = [False] * len(ids)
    done = ""  # the conversation rendered so far
    for i, message in enumerate(messages):
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            parts = [(done, header, False), (header, through, True)]
        else:
            parts = [(done, through, False)]
        for start, end, trained in parts:
            if not end.startswith(start):
                raise DataError(
                    f"{row.where}: the chat template does not render this conversation turn by turn; "
                    "use style prompt_response"
                )
            piece = tokenizer(end[len(start) :], add_special_tokens=False).input_ids
            ids += piece
            mask += [trained] * len(piece)
        done = through
    if messages[-1]["role"] == "assistant" and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)  # so the policy learns to stop after its last turn
        mask.append(True)
    return ids, mask


def pack(examples: list[TokenExample], max_tokens: int) -> list[TokenExample]:
    """Greedy, in order: concatenate examples while they fit in max_tokens; positions restart per
    example (which is what keeps their attention apart, see the module docstring)."""
    packed, ids, mask, pos = [], [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex) > max_tokens:
            packed.append(TokenExample(tuple(ids), tuple(mask), tuple(pos)))
            ids, mask, pos = [], [], []
        ids += ex.input_ids
        mask += ex.loss_mask
        pos += range(len(ex))
    if ids:
        packed.append(TokenExample(tuple(ids), tuple(mask), tuple(pos)))
    return packed


def collate(examples: list[TokenExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, position_ids and loss_mask, each (B, L).

    loss_mask[b, t] marks input_ids[b, t] as a target, predicted by the logits at t - 1.
    """
    L = max(len(ex) for ex in examples)
    B = len(examples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    loss_mask = torch.zeros((B, L), dtype=torch.bool)
    for b, ex in enumerate(examples):
        n = len(ex)
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        attention[b, :n] = 1
        positions[b, :n] = torch.tensor(ex.position_ids) if ex.position_ids is not None else torch.arange(n)
        loss_mask[b, :n] = torch.tensor(ex.loss_mask)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions, "loss_mask": loss_mask}
