"""The reward channel against an external gRPC reward server that misbehaves: a real grpc server on
127.0.0.1 answering with the scores a test chooses. Scores are checked (count, finiteness: the
first bad sample named) and come back as one source (B, 1), which `combine` clips to reward.clip
as it does the job's own reward; RESOURCE_EXHAUSTED (overloaded) is retried
within reward.outage_budget_s; past it the call raises RoleOutage naming the server and budget."""

from __future__ import annotations

import math
from concurrent import futures

import grpc
import pytest
import torch

from keel.config import GrpcConfig, RewardConfig, RewardFunctionSource
from keel.controller.channels import GrpcReward
from keel.controller.supervisor import RoleOutage
from keel.reward.client import RewardClient
from keel.reward.model import RewardError
from keel.trajectory import Trajectories
from keel.transport.pb import reward_pb2, reward_pb2_grpc


def _traj(B: int = 3) -> Trajectories:
    R = 2
    return Trajectories(
        rollout_id="r",
        weight_version=0,
        prompt_ids=[f"p{i}" for i in range(B)],
        sample_index=[0] * B,
        prompt_tokens=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_tokens=torch.ones(B, R, dtype=torch.long),
        response_mask=torch.ones(B, R, dtype=torch.bool),
        behaviour_logprobs=-torch.ones(B, R),
        prompts=["q"] * B,
        responses=["a"] * B,
    )


class _Scripted(reward_pb2_grpc.RewardServiceServicer):
    """Answers each call with the next entry of `answers`: a list of scores, or a status code to abort with."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = 0

    def Score(self, request, context):
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, grpc.StatusCode):
            context.abort(answer, "busy")
        return reward_pb2.ScoreResponse(request_id=request.request_id, scores=answer, scorer="scripted")


@pytest.fixture
def serve():
    servers = []

    def start(answers):
        servicer = _Scripted(answers)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def channel_source() -> RewardFunctionSource:
    return RewardFunctionSource(function="keel.reward.rules:arithmetic")


def _channel(address: str, **reward) -> GrpcReward:
    cfg = RewardConfig(source=channel_source(), **reward)
    client = RewardClient(GrpcConfig(auth=False, retries=0), address, base_delay_s=0.01)
    return GrpcReward([client], cfg, log=lambda *_: None)


def test_scores_are_clipped_like_the_jobs_own_reward(serve):
    from keel.reward.combine import combine

    _, address = serve([[0.5, -7.0, 3.0]])
    channel = _channel(address, clip=1.0)
    raw = channel.submit(_traj(), None, 4).result()
    assert raw.tolist() == [[0.5], [-7.0], [3.0]]  # an external server's scores: one source, raw
    assert combine(raw, RewardConfig(source=channel_source(), clip=1.0)).scores.tolist() == [0.5, -1.0, 1.0]
    channel.close()


@pytest.mark.parametrize(
    "answer, message",
    [
        ([1.0, math.nan, 0.0], r"sample p1/0 \(row 1\) scored nan, not a finite number"),
        ([1.0, 2.0, math.inf], r"sample p2/0 \(row 2\) scored inf"),
        ([1.0, 2.0], r"2 scores for 3 samples"),
    ],
)
def test_a_wrong_count_or_a_non_finite_score_names_the_sample(serve, answer, message):
    _, address = serve([answer])
    channel = _channel(address)
    with pytest.raises(RewardError, match=message):
        channel.submit(_traj(), None, 4).result()
    channel.close()


def test_an_overloaded_server_is_retried_within_the_budget(serve):
    servicer, address = serve([grpc.StatusCode.RESOURCE_EXHAUSTED] * 2 + [[1.0, 2.0, 3.0]])
    channel = _channel(address, outage_budget_s=30.0)
    assert channel.submit(_traj(), None, 4).result().tolist() == [[1.0], [2.0], [3.0]]
    assert servicer.calls == 3 and channel.metrics()["reward/outage_s"] > 0
    channel.close()


def test_past_the_budget_the_call_raises_an_outage_naming_the_server(serve):
    _, address = serve([grpc.StatusCode.UNAVAILABLE])
    channel = _channel(address, outage_budget_s=1.0)
    expected = rf"reward: server {address} unreachable .* at step 4, past reward\.outage_budget_s \(1s\)"
    with pytest.raises(RoleOutage, match=expected):
        channel.submit(_traj(), None, 4).result()
    channel.close()


def test_a_refused_call_is_not_retried(serve):
    servicer, address = serve([grpc.StatusCode.PERMISSION_DENIED])
    channel = _channel(address, outage_budget_s=30.0)
    with pytest.raises(RewardError, match="PERMISSION_DENIED"):
        channel.submit(_traj(), None, 4).result()
    assert servicer.calls == 1
    channel.close()
