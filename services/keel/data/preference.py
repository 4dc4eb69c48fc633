"""Preference pairs (prompt, chosen, rejected[, margin]) for reward-model training and DPO.

A pair keeps both views a trainer needs: the texts (a reward model scores prompt + response
text, exactly as the reward server will at PPO time) and the token ids (DPO scores the
response tokens, with EOS, after the prompt encoded as PPO encodes it).
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.config import PreferenceDataConfig
from keel.data.prompts import encode_prompt
from keel.data.rows import DataError, Row
from keel.data.sft import encode_response


@dataclass(frozen=True)
class PreferencePair:
    where: str  # file and row, for messages
    prompt: str  # as the policy sees it (chat-templated when asked)
    chosen: str
    rejected: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]  # response tokens, EOS included
    rejected_ids: tuple[int, ...]
    margin: float | None = None


@dataclass(frozen=True)
class PairSet:
    pairs: list[PreferencePair]
    truncated: int = 0
    dropped: int = 0


def build_pairs(rows: list[Row], cfg: PreferenceDataConfig, tokenizer) -> PairSet:
    pairs, truncated, dropped = [], 0, 0
    for row in rows:
        prompt, prompt_ids = encode_prompt(tokenizer, row.text(cfg.prompt_field), cfg.apply_chat_template)
        chosen = row.text(cfg.chosen_field, allow_empty=True)
        rejected = row.text(cfg.rejected_field, allow_empty=True)
        if chosen == rejected:
            raise DataError(f"{row.where}: chosen and rejected are the same text")
        margin = row.number(cfg.margin_field) if cfg.margin_field else None
        chosen_ids, rejected_ids = encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if longest > cfg.max_tokens:
            if cfg.overlong == "error":
                raise DataError(f"{row.where}: {longest} tokens, limit is data.max_tokens {cfg.max_tokens}")
            room = cfg.max_tokens - len(prompt_ids)
            if cfg.overlong == "drop" or room < 1:
                dropped += 1
                continue
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            chosen = tokenizer.decode(chosen_ids, skip_special_tokens=True)
            rejected = tokenizer.decode(rejected_ids, skip_special_tokens=True)
            truncated += 1
        pairs.append(
            PreferencePair(
                row.where, prompt, chosen, rejected, tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids), margin
            )
        )
    return PairSet(pairs, truncated, dropped)
