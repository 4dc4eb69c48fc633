"""The standalone reward server over real gRPC on 127.0.0.1: batching, errors, retries,
reflection, health, and graceful shutdown of the `keel serve reward` process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from keel.config import GrpcConfig, RewardConfig, RewardFunctionSource, RewardServerSource
from keel.controller.actors import free_port
from keel.reward.client import RewardClient, RewardUnavailable
from keel.reward.model import RewardError
from keel.reward.server import RewardServerConfig, start_reward_server
from keel.transport.pb import reward_pb2, reward_pb2_grpc
from keel.transport.retry import backoff_delays

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # so the server can import slow_reward by name


def _server_cfg(function="slow_reward:length", port=0, **kw):
    return RewardServerConfig(
        reward=RewardConfig(source=RewardFunctionSource(function=function, kwargs=kw.pop("kwargs", {}))),
        grpc=GrpcConfig(auth=False),
        port=port,
        **kw,
    )


@pytest.fixture
def server():
    running = []

    def start(cfg):
        r = start_reward_server(cfg)
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop(0)


def test_concurrent_clients_are_batched_and_each_gets_its_own_scores(server):
    running = server(_server_cfg(max_batch_size=64, max_wait_ms=50, kwargs={"delay_s": 0.05}))
    client = RewardClient(GrpcConfig(auth=False), f"127.0.0.1:{running.port}")

    def call(k):
        responses = ["x" * (k + j) for j in range(3)]
        return k, client.score(["p"] * 3, responses).tolist()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    for k, scores in results:
        assert scores == [float(k), float(k + 1), float(k + 2)]
    assert running.batcher.batches < 16  # calls were grouped, not scored one by one


def test_bad_requests_and_bad_scores_are_invalid_argument(server):
    running = server(_server_cfg("slow_reward:nan_on_bad", max_request_samples=4))
    address = f"127.0.0.1:{running.port}"
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(reward_pb2.ScoreRequest(request_id="e"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "samples: empty" in info.value.details()
    too_many = reward_pb2.ScoreRequest(samples=[reward_pb2.ScoreSample(response="ok")] * 5)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(too_many, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "samples: 5 exceeds max_request_samples 4" in info.value.details()
    client = RewardClient(GrpcConfig(auth=False), address)
    with pytest.raises(RewardError, match=r"sample s1 \(row 1\) scored nan"):
        client.score(["p", "p"], ["fine", "bad"], ids=["s0", "s1"])
    # the server keeps serving after a bad batch
    assert client.score(["p"], ["fine"]).tolist() == [1.0]


def test_client_retries_until_the_server_comes_up_then_gives_up_clearly(server):
    port = free_port()
    cfg = GrpcConfig(auth=False, retries=6, deadline_s=2.0)
    client = RewardClient(cfg, f"127.0.0.1:{port}", base_delay_s=0.2)
    threading.Timer(0.5, lambda: server(_server_cfg(port=port))).start()
    assert client.score(["p"], ["abc"]).tolist() == [3.0]

    dead = RewardClient(
        GrpcConfig(auth=False, retries=2, deadline_s=1.0), f"127.0.0.1:{free_port()}", base_delay_s=0.01
    )
    with pytest.raises(RewardUnavailable, match=r"UNAVAILABLE after 3 attempt\(s\)"):
        dead.score(["p"], ["abc"])


def test_backoff_is_exponential_with_jitter():
    import random

    delays = backoff_delays(6, base_s=0.1, cap_s=1.0, rng=random.Random(0))
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(0 <= d <= c for d, c in zip(delays, caps, strict=True))
    assert len(set(delays)) == 6


def test_reflection_and_health(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    running = server(_server_cfg())
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="keel.v1.RewardService"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "keel.v1.RewardService" in names


def test_serve_reward_cli_finishes_in_flight_request_on_sigterm(tmp_path):
    port = free_port()
    config = tmp_path / "reward.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "reward": {
                    "source": {"type": "function", "function": "slow_reward:length", "kwargs": {"delay_s": 2.0}}
                },
                "grpc": {"auth": True, "token_file": str(tmp_path / "token")},
                "port": port,
                "grace_s": 10,
            }
        )
    )
    (tmp_path / "token").write_text("t0k3n\n")
    keel = shutil.which("keel", path=str(Path(sys.executable).parent))
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("KEEL_GRPC_TOKEN", None)
    proc = subprocess.Popen(
        [keel, "serve", "reward", "--config", str(config)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert "reward server on 127.0.0.1:" in proc.stdout.readline()
        cfg = GrpcConfig(token_file=str(tmp_path / "token"), deadline_s=20)
        client = RewardClient(cfg, f"127.0.0.1:{port}")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.score, ["p"], ["abcd"])
            time.sleep(0.7)  # the request is now being scored (it takes 2 s)
            proc.send_signal(signal.SIGTERM)
            assert pending.result(timeout=20).tolist() == [4.0]
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_reward_cli_bad_config_exits_2(tmp_path):
    config = tmp_path / "reward.yaml"
    config.write_text(yaml.safe_dump({"reward": {"source": {"type": "function", "function": "x:y"}}, "port": 99999}))
    keel = shutil.which("keel", path=str(Path(sys.executable).parent))
    out = subprocess.run([keel, "serve", "reward", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "port: Input should be less than or equal to 65535" in out.stderr


def test_aio_server_demands_the_token_and_bounds_message_size(server, monkeypatch):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    monkeypatch.setenv("KEEL_GRPC_TOKEN", "aio-secret")
    cfg = RewardServerConfig(
        reward=RewardConfig(source=RewardFunctionSource(function="slow_reward:length")),
        grpc=GrpcConfig(max_message_mb=1.0, weight_chunk_mb=0.5),
        port=0,
    )
    running = server(cfg)
    address = f"127.0.0.1:{running.port}"
    stub = reward_pb2_grpc.RewardServiceStub(
        grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
    )
    request = reward_pb2.ScoreRequest(samples=[reward_pb2.ScoreSample(prompt="p", response="abc")])
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(request, timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", "Bearer aio-secret"),)
    assert list(stub.Score(request, timeout=10, metadata=good).scores) == [3.0]
    big = reward_pb2.ScoreRequest(samples=[reward_pb2.ScoreSample(prompt="p", response="x" * (2 << 20))])
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(big, timeout=10, metadata=good)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # health answers without a token (Kubernetes probes)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address)).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert RewardClient(GrpcConfig(), address).score(["p"], ["abcd"]).tolist() == [4.0]


# --------------------------------------------------------------------------- several sources


def test_a_server_with_several_sources_sends_each_ones_raw_scores_and_their_combination(server):
    """A server's scores are its sources combined over each request; the reply also holds each
    source's raw scores, which a job's own servers send so that the job combines over its batch."""
    sources = [
        RewardFunctionSource(function="slow_reward:length", name="chars", weight=0.5),
        RewardFunctionSource(function="keel.reward.rules:length_penalty", normalize="whiten"),
    ]
    running = server(RewardServerConfig(reward=RewardConfig(sources=sources), grpc=GrpcConfig(auth=False), port=0))
    client = RewardClient(GrpcConfig(auth=False), f"127.0.0.1:{running.port}")
    responses = ["ab", "abcd", "abcdef"]
    raw = client.score_sources(["p"] * 3, responses)
    assert raw.tolist() == [[2.0, -0.25], [4.0, -0.5], [6.0, -0.75]]
    whitened = (raw[:, 1] - raw[:, 1].mean()) / raw[:, 1].std(correction=0)
    torch.testing.assert_close(client.score(["p"] * 3, responses), 0.5 * raw[:, 0] + whitened)
    assert client.scorer == "chars + length_penalty"


def test_a_server_source_is_scored_beside_the_others(server):
    """{type: server}: the job's reward calls a remote `keel serve reward` (with transport.grpc's
    token settings) for one of its sources; a server that is not there fails the start."""
    from keel.reward.model import RewardModel

    running = server(_server_cfg())  # slow_reward:length: one point per character
    reward = RewardConfig(
        sources=[
            RewardFunctionSource(function="keel.reward.rules:arithmetic"),
            RewardServerSource(address=f"127.0.0.1:{running.port}", name="remote", weight=-0.1),
        ]
    )
    model = RewardModel(reward, GrpcConfig(auth=False))
    prompts, responses, metadata = ["1+1="] * 3, ["2", "3", "2 and more"], [{"answer": "2"}] * 3
    raw = model.score_sources(prompts, responses, metadata)
    torch.testing.assert_close(raw, torch.tensor([[1.0, 1.0], [0.1, 1.0], [1.0, 10.0]]))
    torch.testing.assert_close(model.score(prompts, responses, metadata), torch.tensor([0.9, 0.0, 0.0]))
    dead = RewardConfig(sources=[RewardServerSource(address=f"127.0.0.1:{free_port()}")])
    with pytest.raises(RewardUnavailable, match="UNAVAILABLE"):
        RewardModel(dead, GrpcConfig(auth=False, retries=1, deadline_s=1.0))


# --------------------------------------------------------------------------- hostile callers


@pytest.mark.parametrize(
    "function, bad_sample",
    [
        ("keel.reward.rules:arithmetic", {"prompt": "2+2=", "response": "4", "metadata": {}}),  # ValueError
        ("slow_reward:nan_on_bad", {"prompt": "2+2=", "response": "bad", "metadata": {"answer": "4"}}),  # NaN
    ],
)
def test_a_bad_caller_fails_alone_naming_only_its_own_sample(server, function, bad_sample):
    running = server(_server_cfg(function, max_batch_size=256, max_wait_ms=200))
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
    callers, bad = 30, {3, 11, 24}
    start = threading.Barrier(callers)  # all at once, so that good and bad requests share a batch

    def call(k):
        good = {"prompt": "2+2=", "response": "4", "metadata": {"answer": "4"}}
        samples = [
            reward_pb2.ScoreSample(sample_id=f"c{k}-s{j}", **(bad_sample if k in bad and j == 1 else good))
            for j in range(3)
        ]
        start.wait()
        try:
            return list(stub.Score(reward_pb2.ScoreRequest(request_id=f"c{k}", samples=samples), timeout=30).scores)
        except grpc.RpcError as err:
            return err.code(), err.details()

    with ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(call, range(callers)))
    for k, result in enumerate(results):
        if k not in bad:
            assert result == [1.0, 1.0, 1.0], (k, result)
            continue
        code, details = result
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (k, details)
        assert f"sample c{k}-s1 (row 1)" in details
        assert set(re.findall(r"c(\d+)-s\d+", details)) == {str(k)}, details  # no other caller's ids


def test_undecodable_request_is_invalid_argument(server):
    running = server(_server_cfg())
    score = grpc.insecure_channel(f"127.0.0.1:{running.port}").unary_unary("/keel.v1.RewardService/Score")
    not_utf8 = b"\x1a\x01\xff"  # ScoreSample.response = b"\xff": a string that is not UTF-8
    for payload in (b"\xff\xff\xff\xff", b"\x12" + bytes([len(not_utf8)]) + not_utf8):
        with pytest.raises(grpc.RpcError) as info:
            score(payload, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "request: the bytes are not a valid keel.v1.ScoreRequest"
    # and the server keeps serving
    reply = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}")).Score(
        reward_pb2.ScoreRequest(samples=[reward_pb2.ScoreSample(response="abc")]), timeout=10
    )
    assert list(reply.scores) == [3.0]


HUNG_REWARD = """
import pathlib, threading

def hang(prompts, responses, metadata, started):
    pathlib.Path(started).touch()
    threading.Event().wait()  # never returns
"""


def test_serve_reward_cli_with_a_hung_scorer_exits_within_grace_of_sigterm(tmp_path):
    (tmp_path / "hung_reward.py").write_text(HUNG_REWARD)
    started = tmp_path / "started"
    config = tmp_path / "reward.yaml"
    port, grace_s = free_port(), 1.0
    source = {"type": "function", "function": "hung_reward:hang", "kwargs": {"started": str(started)}}
    config.write_text(
        yaml.safe_dump({"reward": {"source": source}, "grpc": {"auth": False}, "port": port, "grace_s": grace_s})
    )
    keel = shutil.which("keel", path=str(Path(sys.executable).parent))
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [keel, "serve", "reward", "--config", str(config)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert "reward server on 127.0.0.1:" in proc.stdout.readline()
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = reward_pb2.ScoreRequest(samples=[reward_pb2.ScoreSample(response="x")])
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(stub.Score, request, timeout=30)
            deadline = time.monotonic() + 20
            while not started.exists():  # the scorer is now stuck
                assert time.monotonic() < deadline, "the scorer was never called"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            try:
                proc.wait(timeout=grace_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail("keel serve reward did not exit after SIGTERM")
            took = time.monotonic() - sent
            with pytest.raises(grpc.RpcError):
                pending.result(timeout=10)  # the stuck call ends with an error, not a score
        assert proc.returncode == 0
        assert took <= grace_s + 1.0, f"exited {took:.2f}s after SIGTERM (grace {grace_s}s)"
    finally:
        if proc.poll() is None:
            proc.kill()
