"""The one trajectory schema every role reads and writes.

A `Trajectories` batch is made by a rollout worker and filled in, field group by field group,
as it moves through the step: scoring adds `scores`, the reference adds `ref_logprobs`, the
critic `values`, the learner `old_logprobs`, the controller `advantages` and `returns`. The
object-store payload is this dataclass itself; the gRPC `TrajectoryBatch` message converts to
and from it in `keel.transport` (one place).

Shapes: B samples, P prompt tokens (left-padded), R response tokens (right-padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Trajectories:
    # --- identity -------------------------------------------------------------------------
    rollout_id: str  # unique per batch
    weight_version: int  # version of the policy weights that generated every sample
    prompt_ids: list[str]  # (B,) the prompt each sample answers; samples of one prompt share it
    sample_index: list[int]  # (B,) index among the n samples of its prompt

    # --- tokens (made by rollout) ---------------------------------------------------------
    prompt_tokens: torch.Tensor  # (B, P) int64, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    response_tokens: torch.Tensor  # (B, R) int64, right-padded
    response_mask: torch.Tensor  # (B, R) bool, True on generated tokens (EOS included)
    behaviour_logprobs: torch.Tensor  # (B, R) float32 log pi_behaviour(a_t) from the sampler

    # --- text for the reward ----------------------------------------------------------------
    prompts: list[str]  # (B,) prompt text
    responses: list[str]  # (B,) decoded response, special tokens skipped
    metadata: list[dict[str, str]] = field(default_factory=list)  # (B,) task fields for the reward

    # --- filled in during the step -----------------------------------------------------------
    scores: torch.Tensor | None = None  # (B,) float32 sequence reward
    ref_logprobs: torch.Tensor | None = None  # (B, R) log pi_ref(a_t)
    values: torch.Tensor | None = None  # (B, R) critic V(s_t)
    old_logprobs: torch.Tensor | None = None  # (B, R) log pi_old(a_t), the learner's own forward pass
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    is_weights: torch.Tensor | None = None  # (B, R) truncated importance weights (async, off_policy: tis)

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return self.response_tokens.shape[0]

    # ------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check that every field agrees on B, P and R; raise ValueError naming the field."""
        B, R = self.response_tokens.shape
        P = self.prompt_tokens.shape[1]
        expect = {
            "prompt_tokens": (B, P),
            "prompt_mask": (B, P),
            "response_mask": (B, R),
            "behaviour_logprobs": (B, R),
            "scores": (B,),
            "ref_logprobs": (B, R),
            "values": (B, R),
            "old_logprobs": (B, R),
            "advantages": (B, R),
            "returns": (B, R),
            "is_weights": (B, R),
        }
        for name, shape in expect.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"trajectories.{name}: shape {tuple(value.shape)}, expected {shape}")
        for name in ("prompt_ids", "sample_index", "prompts", "responses"):
            if len(getattr(self, name)) != B:
                raise ValueError(f"trajectories.{name}: {len(getattr(self, name))} entries for {B} samples")
        if self.metadata and len(self.metadata) != B:
            raise ValueError(f"trajectories.metadata: {len(self.metadata)} entries for {B} samples")

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + R) prompt and response tokens side by side."""
        return torch.cat([self.prompt_tokens, self.response_tokens], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) 1 on real tokens (prompt and response), 0 on padding."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()

    @property
    def group_index(self) -> torch.Tensor:
        """(B,) int: samples answering the same prompt share a group id."""
        ids = {pid: i for i, pid in enumerate(dict.fromkeys(self.prompt_ids))}
        return torch.tensor([ids[p] for p in self.prompt_ids], dtype=torch.long)

    @property
    def sample_ids(self) -> list[str]:
        """(B,) "prompt_id/sample_index": how errors and logs name a sample."""
        return [f"{p}/{s}" for p, s in zip(self.prompt_ids, self.sample_index, strict=True)]

    def with_fields(self, **updates) -> Trajectories:
        """A copy with some fields replaced (validated)."""
        return replace(self, **updates)

    def select(self, index: torch.Tensor | list[int]) -> Trajectories:
        """Rows `index` of every per-sample field (a mini-batch)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[idx]
            elif isinstance(value, list) and value:
                out[f.name] = [value[i] for i in rows]
            else:
                out[f.name] = value
        return Trajectories(**out)

    @staticmethod
    def concat(batches: list[Trajectories], pad_token_id: int, oldest_version: bool = False) -> Trajectories:
        """Join batches from several workers: prompts re-padded on the left, responses on the right.

        Every batch must come from the same weight version (the sync loop's invariant), unless
        `oldest_version`: then the joined batch is tagged with the oldest of them (async mode).
        """
        if not batches:
            raise ValueError("concat of no batches")
        versions = {b.weight_version for b in batches}
        if len(versions) != 1 and not oldest_version:
            raise ValueError(f"cannot concat trajectories from weight versions {sorted(versions)}")
        versions = {min(versions)}
        P = max(b.prompt_tokens.shape[1] for b in batches)
        R = max(b.response_tokens.shape[1] for b in batches)
        out: dict = {"rollout_id": "+".join(b.rollout_id for b in batches), "weight_version": versions.pop()}
        for f in fields(Trajectories):
            if f.name in out:
                continue
            values = [getattr(b, f.name) for b in batches]
            if all(v is None for v in values):
                out[f.name] = None
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            elif f.name.startswith("prompt_"):
                fill = pad_token_id if f.name == "prompt_tokens" else 0
                out[f.name] = torch.cat([_pad_left(v, P, fill) for v in values])
            elif values[0].dim() == 1:
                out[f.name] = torch.cat(values)
            else:
                fill = pad_token_id if f.name == "response_tokens" else 0
                out[f.name] = torch.cat([_pad_right(v, R, fill) for v in values])
        return Trajectories(**out)


def pad_prompts_and_responses(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch layout every role uses: prompts left-padded, responses right-padded.

    Returns prompt_tokens (B, P) int64, prompt_mask (B, P) bool, response_tokens (B, R) int64,
    response_mask (B, R) bool, with R >= 1 even when every response is empty.
    """
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    prompt_tokens = torch.full((B, P), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.bool)
    response_tokens = torch.full((B, R), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if p:
            prompt_tokens[b, P - len(p) :] = torch.tensor(p)
            prompt_mask[b, P - len(p) :] = True
        if r:
            response_tokens[b, : len(r)] = torch.tensor(r)
            response_mask[b, : len(r)] = True
    return prompt_tokens, prompt_mask, response_tokens, response_mask


def _pad_left(x: torch.Tensor, width: int, fill) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype)
    return torch.cat([pad, x], dim=1)


def _pad_right(x: torch.Tensor, width: int, fill) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype)
    return torch.cat([x, pad], dim=1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting only real tokens, so a left-padded prompt sees the same rotary
    positions as the unpadded sequence vLLM ran: cumsum(mask) - 1, clamped at 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
