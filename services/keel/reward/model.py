"""RewardModel: one finite float per (prompt, response), from an HF reward model or a function."""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from keel.config import RewardConfig, RewardFunctionSource, RewardModelSource


class RewardError(ValueError):
    """A reward that cannot be used (NaN, inf, wrong count, bad function); names the sample."""


def import_function(ref: str, field: str = "reward.source.function") -> Callable:
    """Resolve "package.module:function"; errors name the config `field` that holds `ref`."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"{field}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"{field}: {module_name!r} has no callable {attr!r}")
    return fn


class Scorer(ABC):
    """What the controller needs from a reward: the local `RewardModel` or the gRPC `RewardClient`."""

    @abstractmethod
    def score(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        """(B,) float32 scores; raises RewardError naming a bad sample."""

    def score_trajectories(self, traj) -> torch.Tensor:
        """Score a `Trajectories` batch; errors name the sample as prompt_id/sample_index."""
        return self.score(traj.prompts, traj.responses, traj.metadata, traj.sample_ids)


def fill_defaults(prompts: list[str], metadata, ids) -> tuple[list[dict[str, str]], list[str]]:
    """Empty metadata and row-number ids where the caller gave none."""
    return metadata or [{} for _ in prompts], ids or [str(i) for i in range(len(prompts))]


def checked_scores(values: list, ids: list[str], name: str, clip: float | None) -> torch.Tensor:
    """(B,) float32 scores from what a scorer returned for the samples `ids`: one finite number per
    sample (a RewardError names the first that is not), clipped to [-clip, clip] when set."""
    if len(values) != len(ids):
        raise RewardError(f"reward {name}: returned {len(values)} scores for {len(ids)} samples")
    for i, v in enumerate(values):
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise RewardError(f"reward {name}: sample {ids[i]} (row {i}) scored {v!r}, not a finite number")
    scores = torch.tensor(values, dtype=torch.float32)
    return scores.clamp(-clip, clip) if clip is not None else scores


class RewardModel(Scorer):
    """Scores batches. The controller wraps it in a Ray actor; `keel serve reward` in a gRPC server."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.samples = 0  # samples scored: this replica's share of the load
        source = cfg.source
        if isinstance(source, RewardFunctionSource):
            self.name = source.function
            fn = import_function(source.function)
            self._score = lambda prompts, responses, metadata: fn(prompts, responses, metadata, **source.kwargs)
        else:
            self.name = source.path
            self._score = _ModelScorer(source)

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        """(B,) float32 scores, clipped per config. Raises RewardError naming a bad sample."""
        metadata, ids = fill_defaults(prompts, metadata, ids)
        if not (len(prompts) == len(responses) == len(metadata)):
            raise RewardError(
                f"reward: {len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata rows"
            )
        raw = self._score(prompts, responses, metadata)
        scores = checked_scores(
            raw.tolist() if isinstance(raw, torch.Tensor) else list(raw), ids, self.name, self.cfg.clip
        )
        self.samples += len(scores)
        return scores

    def samples_scored(self) -> int:
        """How many samples this replica has scored (several replicas share each batch)."""
        return self.samples


def reward_model_inputs(tokenizer, prompts: list[str], responses: list[str], max_tokens: int) -> dict:
    """How a reward model reads a sample, in training (`keel rm`) and in scoring alike: the prompt
    text followed by the response text, right-padded, truncated from the left (the end of the
    response is what matters). The model pools the last real token."""
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "right"
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)


class _ModelScorer:
    """An HF AutoModelForSequenceClassification with one label: its logit is the score."""

    def __init__(self, source: RewardModelSource):
        from transformers import AutoModelForSequenceClassification

        from keel.models.loading import load_tokenizer

        self.source = source
        self.tokenizer = load_tokenizer(source.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
        if self.model.config.num_labels != 1:
            raise RewardError(f"reward.source.path: {source.path} has {self.model.config.num_labels} labels, need 1")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, str]]) -> torch.Tensor:
        out = []
        size = self.source.batch_size
        for start in range(0, len(prompts), size):
            batch = reward_model_inputs(
                self.tokenizer, prompts[start : start + size], responses[start : start + size], self.source.max_tokens
            )
            out.append(self.model(**batch).logits[:, 0].float())
        return torch.cat(out)
