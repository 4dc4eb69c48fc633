"""RewardClient: scores over gRPC with per-call deadlines and retries on UNAVAILABLE.

Retries back off exponentially with full jitter; when the retry budget is spent, or the server
says it is overloaded, the client raises `RewardUnavailable` (the controller rides out such an
outage for reward.outage_budget_s), and a bad sample or a refused call raises `RewardError`, so a
training step never goes on with a missing reward.
"""

from __future__ import annotations

import uuid

import grpc
import torch

from keel.config import GrpcConfig
from keel.reward.model import RewardError, Scorer, fill_defaults
from keel.transport.pb import reward_pb2, reward_pb2_grpc
from keel.transport.retry import Unavailable, call_with_retries
from keel.transport.security import GrpcClient


class RewardUnavailable(Unavailable):
    """The reward server could not be reached within the retry budget, or answered that it is
    overloaded or too slow: worth trying again later (the controller does, for reward.outage_budget_s)."""


def transient(err: grpc.RpcError) -> bool:
    """A failure that may pass: the server down or restarting (UNAVAILABLE), overloaded
    (RESOURCE_EXHAUSTED, but not a message over the size limit, which stays too large), or late
    (DEADLINE_EXCEEDED). A bad sample, a wrong token or a server bug is not."""
    code = err.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "larger than max" not in (err.details() or "")
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RewardClient(GrpcClient, Scorer):
    def __init__(self, cfg: GrpcConfig, address: str, base_delay_s: float = 0.1):
        super().__init__(cfg, address, reward_pb2_grpc.RewardServiceStub, base_delay_s)
        self.scorer: str | None = None  # what the server says produced the scores

    def wait_ready(self) -> None:
        """Block until the server answers a health check (retrying like a call); raises RewardUnavailable."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service="keel.v1.RewardService")
        reply = call_with_retries(
            lambda: stub.Check(request, timeout=self.cfg.deadline_s),
            self.cfg.retries,
            f"reward server {self.address}",
            self.base_delay_s,
            RewardUnavailable,
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RewardUnavailable(f"reward server {self.address}: health status {reply.status}, not SERVING")

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        """(B,) the server's scores: its sources combined over this request."""
        reply = self._call(prompts, responses, metadata, ids)
        return torch.tensor(list(reply.scores), dtype=torch.float32)

    def score_sources(
        self,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, str]] | None = None,
        ids: list[str] | None = None,
    ) -> torch.Tensor:
        """(B, S) each of the server's sources' raw scores, in its source order; a server that sends no
        per-source scores counts as one source, its scores."""
        reply = self._call(prompts, responses, metadata, ids)
        if not reply.sources:
            return torch.tensor(list(reply.scores), dtype=torch.float32)[:, None]
        for source in reply.sources:
            if len(source.scores) != len(prompts):
                raise RewardError(
                    f"reward server {self.address}: source {source.name}: {len(source.scores)} scores for "
                    f"{len(prompts)} samples"
                )
        return torch.tensor([list(s.scores) for s in reply.sources], dtype=torch.float32).T

    def _call(self, prompts, responses, metadata, ids) -> reward_pb2.ScoreResponse:
        metadata, ids = fill_defaults(prompts, metadata, ids)
        request = reward_pb2.ScoreRequest(
            request_id=uuid.uuid4().hex,
            samples=[
                reward_pb2.ScoreSample(sample_id=i, prompt=p, response=r, metadata=m)
                for p, r, m, i in zip(prompts, responses, metadata, ids, strict=True)
            ],
        )
        try:
            reply = call_with_retries(
                lambda: self._stub.Score(request, timeout=self.cfg.deadline_s, metadata=self._metadata),
                self.cfg.retries,
                f"reward server {self.address}",
                self.base_delay_s,
                RewardUnavailable,
            )
        except grpc.RpcError as err:
            what = f"reward server {self.address}: {err.code().name}: {err.details()}"
            if transient(err):
                raise RewardUnavailable(what) from None
            raise RewardError(what) from None
        if len(reply.scores) != len(prompts):
            raise RewardError(f"reward server {self.address}: {len(reply.scores)} scores for {len(prompts)} samples")
        self.scorer = reply.scorer
        return reply
