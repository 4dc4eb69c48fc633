"""The Generator interface the rollout worker drives, and what it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from keel.config import SamplingConfig


@dataclass(frozen=True)
class Sample:
    """One generated response."""

    prompt_index: int  # index into the prompt list given to generate()
    token_ids: list[int]  # generated tokens, through the one that ended it (EOS, stop id, or completing a stop string)
    logprobs: list[float]  # log pi(token) under the sampling distribution (temperature applied)
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"


class Generator(ABC):
    """Samples n responses per tokenised prompt; takes new weights in place."""

    backend: str

    @abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int) -> list[Sample]:
        """n samples per prompt, grouped by prompt in prompt order."""

    @abstractmethod
    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Replace these weights (HF checkpoint names): all of them, or the part `load_group` makes whole;
        the others keep theirs. Callers validate first: this must not fail halfway."""

    def load_group(self, names: set[str]) -> set[str]:
        """The weights a partial `load_weights` of `names` must carry: `names` and whatever the backend
        loads together with one of them (vLLM fuses q/k/v and gate/up into one layer each)."""
        return set(names)

    @abstractmethod
    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a full update must provide."""
