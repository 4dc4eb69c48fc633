"""RewardClient: scores over gRPC with per-call deadlines and retries on UNAVAILABLE.

Retries back off exponentially with full jitter; when the retry budget is spent the client
raises `RewardUnavailable`, so a training step never goes on with a missing reward.
"""

from __future__ import annotations

import random
import time
import uuid

import grpc
import torch

from keel.config import GrpcConfig
from keel.reward.model import RewardError, Scorer, fill_defaults
from keel.transport.pb import reward_pb2, reward_pb2_grpc
from keel.transport.security import call_metadata, make_channel

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class RewardUnavailable(RuntimeError):
    """The reward server could not be reached within the retry budget."""


def backoff_delays(
    retries: int, base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None
) -> list[float]:
    """Full-jitter exponential backoff: delay_k ~ U(0, min(cap, base * 2^k)), k = 0..retries-1."""
    rng = rng or random.Random()
    return [rng.uniform(0.0, min(cap_s, base_s * 2**k)) for k in range(retries)]


class RewardClient(Scorer):
    def __init__(self, cfg: GrpcConfig, address: str, base_delay_s: float = 0.1):
        self.cfg = cfg
        self.address = address
        self.base_delay_s = base_delay_s
        self._channel = make_channel(cfg, address)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        self._metadata = call_metadata(cfg)

    def close(self) -> None:
        self._channel.close()

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        metadata, ids = fill_defaults(prompts, metadata, ids)
        request = reward_pb2.ScoreRequest(
            request_id=uuid.uuid4().hex,
            samples=[
                reward_pb2.ScoreSample(sample_id=i, prompt=p, response=r, metadata=m)
                for p, r, m, i in zip(prompts, responses, metadata, ids, strict=True)
            ],
        )
        delays = backoff_delays(self.cfg.retries, self.base_delay_s)
        for attempt in range(self.cfg.retries + 1):
            try:
                reply = self._stub.Score(request, timeout=self.cfg.deadline_s, metadata=self._metadata)
                break
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RewardError(f"reward server {self.address}: {err.details()}") from None
                if code not in RETRYABLE or attempt == self.cfg.retries:
                    raise RewardUnavailable(
                        f"reward server {self.address}: {code.name} after {attempt + 1} attempt(s): {err.details()}"
                    ) from None
                time.sleep(delays[attempt])
        if len(reply.scores) != len(prompts):
            raise RewardError(f"reward server {self.address}: {len(reply.scores)} scores for {len(prompts)} samples")
        return torch.tensor(list(reply.scores), dtype=torch.float32)
