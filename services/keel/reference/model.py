"""ReferenceModel: the frozen initial policy scoring per-token log-probs of trajectories."""

from __future__ import annotations

import torch

from keel.models.loading import load_causal_lm, response_logprobs
from keel.trajectory import Trajectories


class ReferenceModel:
    """Never trained. The controller wraps it in a Ray actor."""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        micro_batch_size: int = 8,
        temperature: float = 1.0,
        precision: str = "full",
    ):
        self.model = load_causal_lm(path, dtype).eval()
        self.precision = precision  # model.precision: mixed autocasts its forward to bfloat16, as the learner does
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        self.samples = 0  # samples scored: this replica's share of the load

    def logprobs(self, traj: Trajectories) -> torch.Tensor:
        """(B, R) log pi_ref(a_t) at the sampling temperature, 0 on padding."""
        lp = response_logprobs(
            self.model,
            traj.input_ids,
            traj.attention_mask,
            traj.prompt_tokens.shape[1],
            self.temperature,
            self.micro_batch_size,
            self.precision,
        )
        self.samples += len(traj)
        return lp * traj.response_mask

    def samples_scored(self) -> int:
        """How many samples this replica has scored (several replicas share each batch)."""
        return self.samples
