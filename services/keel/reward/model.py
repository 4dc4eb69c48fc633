"""RewardModel: one finite float per (prompt, response), from an HF reward model, a function, a
remote reward server or a judge LM asked about a constitution (keel.reward.judge), or several of
them combined (`reward.sources`, keel.reward.combine)."""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from keel.config import (
    GrpcConfig,
    RewardConfig,
    RewardFunctionSource,
    RewardJudgeSource,
    RewardModelSource,
    RewardServerSource,
    reward_sources,
    source_name,
    source_path,
)


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

    @abstractmethod
    def score_sources(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        """(B, S) float32 raw scores of each source, columns in reward.sources order; not combined."""

    def score_trajectories(self, traj) -> torch.Tensor:
        """Score a `Trajectories` batch; errors name the sample as prompt_id/sample_index."""
        return self.score(traj.prompts, traj.responses, traj.metadata, traj.sample_ids)

    def score_trajectories_by_source(self, traj) -> torch.Tensor:
        """(B, S) raw per-source scores of a `Trajectories` batch: what a reward actor returns for its
        shard (the controller combines the joined batch, keel.reward.combine)."""
        return self.score_sources(traj.prompts, traj.responses, traj.metadata, traj.sample_ids)


def fill_defaults(prompts: list[str], metadata, ids) -> tuple[list[dict[str, str]], list[str]]:
    """Empty metadata and row-number ids where the caller gave none."""
    return metadata or [{} for _ in prompts], ids or [str(i) for i in range(len(prompts))]


def checked_scores(values: list, ids: list[str], name: str) -> torch.Tensor:
    """(B,) float32 scores from what source `name` returned for the samples `ids`: one finite number
    per sample (a RewardError names the first that is not). Raw: clipping is the combination's
    (keel.reward.combine)."""
    if len(values) != len(ids):
        raise RewardError(f"reward {name}: returned {len(values)} scores for {len(ids)} samples")
    for i, v in enumerate(values):
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise RewardError(f"reward {name}: sample {ids[i]} (row {i}) scored {v!r}, not a finite number")
    return torch.tensor(values, dtype=torch.float32)


class RewardModel(Scorer):
    """Scores batches with every source of a RewardConfig. The controller wraps it in a Ray actor;
    `keel serve reward` in a gRPC server. `grpc` holds the token and TLS settings a server source is
    called with (default: GrpcConfig's defaults)."""

    def __init__(self, cfg: RewardConfig, grpc: GrpcConfig | None = None):
        self.cfg = cfg
        self.samples = 0  # samples scored: this replica's share of the load
        sources = reward_sources(cfg)
        self._scorers = [_scorer(s, source_path(cfg, i), grpc) for i, s in enumerate(sources)]
        labels = [_label(s) for s in sources]
        names = [source_name(s) for s in sources]
        # errors name the source: what it is, and with several sources its name too
        self._what = labels if len(sources) == 1 else [f"{n} ({lb})" for n, lb in zip(names, labels, strict=True)]
        self.name = labels[0] if len(sources) == 1 else " + ".join(names)

    def score_sources(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        """(B, S) float32 raw scores, one column per source. Raises RewardError naming the source and
        a bad sample."""
        metadata, ids = fill_defaults(prompts, metadata, ids)
        if not (len(prompts) == len(responses) == len(metadata)):
            raise RewardError(
                f"reward: {len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata rows"
            )
        columns = []
        for scorer, what in zip(self._scorers, self._what, strict=True):
            values = scorer(prompts, responses, metadata, ids)
            values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
            columns.append(checked_scores(values, ids, what))
        self.samples += len(prompts)
        return torch.stack(columns, dim=1)

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        """(B,) float32: the sources combined over this batch (whitening included) and clipped per config.
        Raises RewardError naming a bad sample."""
        from keel.reward.combine import combine

        metadata, ids = fill_defaults(prompts, metadata, ids)
        return combine(self.score_sources(prompts, responses, metadata, ids), self.cfg, ids).scores

    def samples_scored(self) -> int:
        """How many samples this replica has scored (several replicas share each batch)."""
        return self.samples


def _label(source) -> str:
    """What a source is, in errors and as a server's scorer name: the function, the model path, the server,
    the judge."""
    if isinstance(source, RewardFunctionSource):
        return source.function
    if isinstance(source, RewardJudgeSource):
        return f"judge {source.model}"
    if isinstance(source, RewardModelSource):
        return source.path
    return f"server {source.address}"


def _scorer(source, path: str, grpc: GrpcConfig | None) -> Callable:
    """fn(prompts, responses, metadata, ids) -> one score per sample, for a source at config `path`."""
    if isinstance(source, RewardFunctionSource):
        fn = import_function(source.function, f"{path}.function")
        return lambda prompts, responses, metadata, ids: fn(prompts, responses, metadata, **source.kwargs)
    if isinstance(source, RewardServerSource):
        grpc = grpc or GrpcConfig()
        if grpc.token_in_clear_text(source.address):  # a run config refuses this at load; keel eval has no grpc
            raise RewardError(
                f"{path}.address: {source.address} is not a loopback address and TLS is off, so the bearer token "
                "would cross the network in clear text"
            )
        return _ServerScorer(source, grpc)
    if isinstance(source, RewardJudgeSource):
        from keel.reward.judge import JudgeScorer

        return JudgeScorer(source, path)
    return _ModelScorer(source, path)


class _ServerScorer:
    """A remote reward server; its scores (its own sources combined) are this source's."""

    def __init__(self, source: RewardServerSource, grpc: GrpcConfig):
        from keel.reward.client import RewardClient

        self.client = RewardClient(grpc, source.address)
        self.client.wait_ready()  # a server that is not there fails the start, not the first step

    def __call__(self, prompts, responses, metadata, ids) -> torch.Tensor:
        return self.client.score(prompts, responses, metadata, ids)


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

    def __init__(self, source: RewardModelSource, path: str = "reward.source"):
        from transformers import AutoModelForSequenceClassification

        from keel.models.loading import load_tokenizer

        self.source = source
        self.tokenizer = load_tokenizer(source.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(source.path).eval()
        if self.model.config.num_labels != 1:
            raise RewardError(f"{path}.path: {source.path} has {self.model.config.num_labels} labels, need 1")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], metadata, ids=None) -> torch.Tensor:
        out = []
        size = self.source.batch_size
        for start in range(0, len(prompts), size):
            batch = reward_model_inputs(
                self.tokenizer, prompts[start : start + size], responses[start : start + size], self.source.max_tokens
            )
            out.append(self.model(**batch).logits[:, 0].float())
        return torch.cat(out)


def source_problems(reward: RewardConfig) -> list[str]:
    """What would stop the sources of `reward` from loading, one line per problem, found before anything
    starts: a model path that is not there, a function that does not import, a judge's constitution
    that does not load. A server source is checked when it is dialled (RewardModel waits for it to answer)."""
    from pathlib import Path

    problems = []
    for i, source in enumerate(reward_sources(reward)):
        path = source_path(reward, i)
        if isinstance(source, RewardModelSource) and not Path(source.path).exists():
            problems.append(f"{path}.path: {source.path} does not exist")
        if isinstance(source, RewardFunctionSource):
            try:
                import_function(source.function, f"{path}.function")
            except RewardError as err:
                problems.append(str(err))
        if isinstance(source, RewardJudgeSource):
            from keel.reward.judge import judge_problems

            problems.extend(judge_problems(source, path))
    return problems
