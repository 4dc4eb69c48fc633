"""Prompt datasets: read, check, tokenise, and hand out batches in a seeded order.

A bad row is an error naming the file and row number; over-long prompts are truncated,
dropped or refused per config, and the count is reported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from keel.config import DataConfig
from keel.data.rows import DataError, Row, read_rows

__all__ = [
    "DataError",
    "Prompt",
    "PromptSampler",
    "PromptSet",
    "encode_prompt",
    "load_prompts",
    "prompt_texts",
    "row_prompt_id",
]


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    token_ids: tuple[int, ...]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt]
    truncated: int = 0
    dropped: int = 0


def encode_prompt(tokenizer, text: str, apply_chat_template: bool) -> tuple[str, list[int]]:
    """(text, token ids) of a prompt as the policy sees it: wrapped as a user turn in the
    tokenizer's chat template when asked and the tokenizer has one. PPO prompts, SFT and DPO
    examples all go through here, so a policy is trained on the prompts it is later given."""
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text, tokenizer(text, add_special_tokens=True).input_ids


def row_prompt_id(cfg: DataConfig, row: Row, index: int) -> str:
    """The prompt id of row `index` of the prompt file: its data.id_field, or its row number."""
    if cfg.id_field and cfg.id_field not in row.fields:
        raise DataError(f"{row.where}: missing id field {cfg.id_field!r}")
    return str(row.fields[cfg.id_field]) if cfg.id_field else str(index)


def prompt_texts(cfg: DataConfig) -> dict[str, str]:
    """Each prompt's text as the prompt file has it (no chat template, no truncation), by prompt id."""
    rows = read_rows(cfg.prompts, cfg.format)
    return {row_prompt_id(cfg, row, i): row.text(cfg.prompt_field) for i, row in enumerate(rows)}


def load_prompts(cfg: DataConfig, tokenizer, max_prompt_tokens: int, path: str | None = None) -> PromptSet:
    """Read `path` (default cfg.prompts), check every row, tokenise, apply the over-long policy."""
    path = path or cfg.prompts
    rows = read_rows(path, cfg.format)
    prompts, truncated, dropped = [], 0, 0
    seen: dict[str, str] = {}  # prompt id -> the row that has it
    for i, row in enumerate(rows):
        text = row.text(cfg.prompt_field)
        metadata = {}
        for name in cfg.metadata_fields:
            if name not in row.fields:
                raise DataError(f"{row.where}: missing metadata field {name!r}")
            metadata[name] = str(row.fields[name])
        prompt_id = row_prompt_id(cfg, row, i)
        if prompt_id in seen:
            # samples are grouped, deduplicated and accounted for by prompt id: two prompts must not share one
            raise DataError(f"{row.where}: prompt id {prompt_id!r} is already used by {seen[prompt_id]}")
        seen[prompt_id] = row.where
        text, ids = encode_prompt(tokenizer, text, cfg.apply_chat_template)
        if len(ids) > max_prompt_tokens:
            if cfg.overlong_prompts == "error":
                raise DataError(f"{row.where}: prompt has {len(ids)} tokens, limit is {max_prompt_tokens}")
            if cfg.overlong_prompts == "drop":
                dropped += 1
                continue
            ids = ids[-max_prompt_tokens:]  # keep the end: it is what the response continues
            text = tokenizer.decode(ids)
            truncated += 1
        prompts.append(Prompt(prompt_id, text, tuple(ids), metadata))
    if not prompts:
        raise DataError(f"{path}: no usable prompts ({dropped} dropped as longer than {max_prompt_tokens} tokens)")
    return PromptSet(prompts, truncated, dropped)


class PromptSampler:
    """Hands out `batch_size` prompts per step, epoch by epoch, reshuffled with a seeded RNG.

    Its state is (epoch, cursor), so a resumed run continues with the same prompts.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int, shuffle: bool = True):
        if batch_size > len(prompts):
            raise DataError(f"prompts_per_step is {batch_size} but the prompt set has only {len(prompts)} prompts")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0
        self._order = self._make_order()
        self._returned: list[Prompt] = []

    def _make_order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Prompt]:
        if self._returned:  # prompts handed back come first, so none is skipped within the epoch
            batch = self._returned[: self.batch_size]
            self._returned = self._returned[self.batch_size :]
            return batch + self._take(self.batch_size - len(batch))
        return self._take(self.batch_size)

    def give_back(self, prompts: list[Prompt]) -> None:
        """Prompts whose samples were thrown away (a stale async batch): they are handed out again next."""
        self._returned = list(prompts) + self._returned

    def _take(self, count: int) -> list[Prompt]:
        if count == 0:
            return []
        if self.cursor + count > len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._make_order()
        batch = [self.prompts[i] for i in self._order[self.cursor : self.cursor + count]]
        self.cursor += count
        return batch

    def state(self) -> dict:
        """Where the sampler is: epoch, position, and the prompts handed back (by id)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "returned": [p.prompt_id for p in self._returned]}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._make_order()  # a pure function of (seed, epoch)
        self._returned = self.by_ids(state.get("returned", []))

    def by_ids(self, ids: list[str]) -> list[Prompt]:
        """The prompts with these ids, in this order; a DataError names any the set lacks."""
        index = {p.prompt_id: p for p in self.prompts}
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(f"prompt ids {missing[:3]} are not in the prompt set (did the prompt file change?)")
        return [index[i] for i in ids]
