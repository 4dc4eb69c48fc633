"""Mutual TLS on real gRPC servers bound to 127.0.0.1: only clients holding a certificate from
`tls_client_ca` get a call through; and deploy/configs/ppo_grpc_reward.yaml, its secret paths
swapped for a PKI made here, speaks it between Keel's own servers and clients."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keel.config import GrpcConfig, parse_config
from keel.transport.pb import reward_pb2, reward_pb2_grpc
from keel.transport.security import (
    SecurityConfigError,
    call_metadata,
    job_tls_problems,
    make_channel,
    make_server,
)

ROOT = Path(__file__).resolve().parents[3]
SECRETS = "/var/run/secrets/keel/"  # where the example config expects its mounted secret


class Echo(reward_pb2_grpc.RewardServiceServicer):
    def Score(self, request, context):
        scores = [len(s.response) for s in request.samples]
        return reward_pb2.ScoreResponse(request_id=request.request_id, scores=scores)


@pytest.fixture
def mtls_server(pki, monkeypatch):
    """A server with TLS that asks every client for a certificate from the test CA; returns its port."""
    monkeypatch.setenv("KEEL_GRPC_TOKEN", "mtls-token")
    cfg = GrpcConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    server, port = make_server(cfg)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(Echo(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.start()
    yield port
    server.stop(None)


def _score(cfg: GrpcConfig, port: int) -> list[float]:
    channel = make_channel(cfg, f"127.0.0.1:{port}")
    try:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(request_id="q", samples=[reward_pb2.ScoreSample(response="abc")])
        return list(stub.Score(request, timeout=10, metadata=call_metadata(cfg)).scores)
    finally:
        channel.close()


def test_mutual_tls_lets_through_only_clients_with_a_certificate_from_the_client_ca(pki, mtls_server):
    client = GrpcConfig(tls_ca=str(pki.ca), tls_client_cert=str(pki.client_cert), tls_client_key=str(pki.client_key))
    assert _score(client, mtls_server) == [3.0]

    refused = {
        "no client certificate": GrpcConfig(tls_ca=str(pki.ca)),
        "a certificate from another CA": GrpcConfig(
            tls_ca=str(pki.ca), tls_client_cert=str(pki.rogue_cert), tls_client_key=str(pki.rogue_key)
        ),
        "no TLS at all": GrpcConfig(),
    }
    for why, cfg in refused.items():
        with pytest.raises(grpc.RpcError) as info:
            _score(cfg, mtls_server)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, why


def test_a_refused_client_gets_not_even_a_health_check(pki, mtls_server):
    """The certificate is checked at the handshake, before any method (health included) runs."""
    channel = make_channel(GrpcConfig(tls_ca=str(pki.ca)), f"127.0.0.1:{mtls_server}")
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_refuses_a_server_whose_certificate_its_ca_did_not_sign(pki, mtls_server):
    cfg = GrpcConfig(tls_ca=str(pki.other_ca), tls_client_cert=str(pki.client_cert), tls_client_key=str(pki.client_key))
    with pytest.raises(grpc.RpcError) as info:
        _score(cfg, mtls_server)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_settings_that_cannot_work_are_named(pki, tmp_path):
    job = GrpcConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    # the job's servers want a client certificate its own clients do not have
    with pytest.raises(SecurityConfigError, match="^transport.grpc.tls_client_cert: tls_client_ca is set"):
        make_channel(job, "127.0.0.1:1")
    assert job_tls_problems(job) == [
        "transport.grpc.tls_client_cert: tls_client_ca is set, so this job's servers ask for a client certificate, "
        "and its own clients have none to present"
    ]
    missing = str(tmp_path / "missing-ca.pem")
    broken = job.model_copy(update={"tls_client_ca": missing, "tls_client_cert": missing, "tls_client_key": missing})
    assert job_tls_problems(broken) == [
        f"transport.grpc.{setting}: {missing} does not exist"
        for setting in ("tls_client_ca", "tls_client_cert", "tls_client_key")
    ]
    with pytest.raises(SecurityConfigError, match="^transport.grpc.tls_client_ca: cannot read"):
        make_server(broken.model_copy(update={"auth": False}))
    with pytest.raises(SecurityConfigError, match="^transport.grpc.tls_client_key: cannot read"):
        make_channel(broken, "127.0.0.1:1")


# --------------------------------------------------------------------------- the example config


def _example_grpc(pki, token_file: Path) -> GrpcConfig:
    """deploy/configs/ppo_grpc_reward.yaml's transport.grpc, its secret paths pointed at this test's
    PKI and its bind address at 127.0.0.1; it must still validate."""
    text = (ROOT / "deploy" / "configs" / "ppo_grpc_reward.yaml").read_text()
    data = yaml.safe_load(text.replace(SECRETS, f"{pki.ca.parent}/"))
    grpc_data = data["transport"]["grpc"]
    grpc_data["host"] = "127.0.0.1"
    grpc_data["token_file"] = str(token_file)
    cfg = parse_config(data).transport.grpc
    # every secret the example names is one this test made
    named = {getattr(cfg, f) for f in ("tls_ca", "tls_cert", "tls_key", "tls_client_ca", "tls_client_cert")}
    assert named | {cfg.tls_client_key} == {
        str(p) for p in (pki.ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key)
    }
    return cfg


@pytest.fixture
def example(pki, tmp_path, monkeypatch) -> GrpcConfig:
    monkeypatch.delenv("KEEL_GRPC_TOKEN", raising=False)  # the example reads its token from the file
    monkeypatch.delenv("KEEL_GRPC_TOKEN_FILE", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("example-token\n")
    return _example_grpc(pki, token_file)


def _without_client_cert(cfg: GrpcConfig) -> GrpcConfig:
    return cfg.model_copy(update={"tls_client_ca": None, "tls_client_cert": None, "tls_client_key": None})


def test_example_config_serves_weights_over_mutual_tls(pki, example):
    """The job's own server of the example (the learner's WeightService) and its client (a rollout
    worker's WeightClient), both from the example's settings."""
    from keel.transport.weights import WeightClient, WeightPublisher, WeightServiceUnavailable

    publisher = WeightPublisher(example)
    try:
        state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
        publisher.publish(1, state)
        assert publisher.address == f"127.0.0.1:{publisher.port}"
        version, fetched = WeightClient(example, publisher.address).fetch(1)
        assert version == 1 and torch.equal(fetched["w"], state["w"])

        quick = {"retries": 0, "deadline_s": 5.0}
        for why, cfg in {
            "no client certificate": _without_client_cert(example),
            "trusts another CA": example.model_copy(update={"tls_ca": str(pki.other_ca)}),
            "a client certificate from another CA": example.model_copy(
                update={"tls_client_cert": str(pki.rogue_cert), "tls_client_key": str(pki.rogue_key)}
            ),
        }.items():
            with pytest.raises(WeightServiceUnavailable):
                WeightClient(cfg.model_copy(update=quick), publisher.address).fetch(1)
                pytest.fail(f"fetched with {why}")
    finally:
        publisher.stop(None)


def test_example_config_scores_on_a_mutual_tls_reward_server(pki, example):
    """`keel serve reward` (deploy/servers/reward.yaml with TLS and a client CA) called by the
    example job's RewardClient."""
    from keel.reward.client import RewardClient, RewardUnavailable
    from keel.reward.server import RewardServerConfig, start_reward_server

    data = yaml.safe_load((ROOT / "deploy" / "servers" / "reward.yaml").read_text())
    data["grpc"].update(
        token_file=example.token_file,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )
    data["port"] = 0
    running = start_reward_server(RewardServerConfig.model_validate(data))
    try:
        address = f"127.0.0.1:{running.port}"
        answer = [{"answer": "4"}]
        assert RewardClient(example, address).score(["2+2="], ["4"], answer).tolist() == [1.0]
        refused = _without_client_cert(example).model_copy(update={"retries": 0, "deadline_s": 5.0})
        with pytest.raises(RewardUnavailable):
            RewardClient(refused, address).score(["2+2="], ["4"], answer)
    finally:
        running.stop(0)
