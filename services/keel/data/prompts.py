"""Prompt datasets: read, check, tokenise, and hand out batches in a seeded order.

A bad row is an error naming the file and row number; over-long prompts are truncated,
dropped or refused per config, and the count is reported.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from keel.config import DataConfig


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


class DataError(ValueError):
    """A bad prompt file or row; the message names the file and the row."""


def _read_rows(cfg: DataConfig, path: str) -> list[dict]:
    if cfg.format == "hf":
        from datasets import load_from_disk

        return [dict(r) for r in load_from_disk(path)]
    rows = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append({"__line__": lineno, **row})
    except OSError as err:
        raise DataError(f"{path}: cannot read prompts ({err.strerror})") from None
    return rows


def load_prompts(cfg: DataConfig, tokenizer, max_prompt_tokens: int, path: str | None = None) -> PromptSet:
    """Read `path` (default cfg.prompts), check every row, tokenise, apply the over-long policy."""
    path = path or cfg.prompts
    rows = _read_rows(cfg, path)
    prompts, truncated, dropped = [], 0, 0
    for i, row in enumerate(rows):
        where = f"{path}:{row.pop('__line__', i + 1)}"
        text = row.get(cfg.prompt_field)
        if text is None:
            raise DataError(f"{where}: missing field {cfg.prompt_field!r}")
        if not isinstance(text, str):
            raise DataError(f"{where}: field {cfg.prompt_field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}: field {cfg.prompt_field!r} is empty")
        metadata = {}
        for name in cfg.metadata_fields:
            if name not in row:
                raise DataError(f"{where}: missing metadata field {name!r}")
            metadata[name] = str(row[name])
        prompt_id = str(row[cfg.id_field]) if cfg.id_field and cfg.id_field in row else str(i)
        if cfg.apply_chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        ids = tokenizer(text, add_special_tokens=True).input_ids
        if len(ids) > max_prompt_tokens:
            if cfg.overlong_prompts == "error":
                raise DataError(f"{where}: prompt has {len(ids)} tokens, limit is {max_prompt_tokens}")
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

    def _make_order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Prompt]:
        if self.cursor + self.batch_size > len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._make_order()
        batch = [self.prompts[i] for i in self._order[self.cursor : self.cursor + self.batch_size]]
        self.cursor += self.batch_size
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._make_order()
