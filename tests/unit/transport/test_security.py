"""Auth, size limits and TLS on real gRPC servers bound to 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from keel.config import GrpcConfig
from keel.transport.pb import reward_pb2, reward_pb2_grpc, weights_pb2, weights_pb2_grpc
from keel.transport.security import SecurityConfigError, call_metadata, load_token, make_channel, make_server
from keel.transport.weights import WeightServicer, WeightStore, fetch_weights


class Echo(reward_pb2_grpc.RewardServiceServicer):
    def Score(self, request, context):
        return reward_pb2.ScoreResponse(
            request_id=request.request_id, scores=[len(s.response) for s in request.samples]
        )


@pytest.fixture
def server(monkeypatch):
    started = []

    def start(cfg: GrpcConfig):
        srv, port = make_server(cfg)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(Echo(), srv)
        store = WeightStore()
        import torch

        store.publish(1, {"w": torch.ones(4)})
        weights_pb2_grpc.add_WeightServiceServicer_to_server(WeightServicer(store), srv)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), srv)
        srv.start()
        started.append(srv)
        return port

    yield start
    for s in started:
        s.stop(None)


def _score(channel, metadata=(), size=3):
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    req = reward_pb2.ScoreRequest(request_id="q", samples=[reward_pb2.ScoreSample(response="x" * size)])
    return stub.Score(req, timeout=10, metadata=metadata)


def test_token_required_on_every_call_but_health(server, monkeypatch):
    monkeypatch.setenv("KEEL_GRPC_TOKEN", "s3cret")
    cfg = GrpcConfig()
    port = server(cfg)
    channel = make_channel(cfg, f"127.0.0.1:{port}")
    assert list(_score(channel, call_metadata(cfg)).scores) == [3.0]
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
        with pytest.raises(grpc.RpcError) as info:
            _score(channel, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # server-streaming methods are guarded too
    stub = weights_pb2_grpc.WeightServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Fetch(weights_pb2.FetchRequest(version=1), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fetch_weights(stub, 1, metadata=call_metadata(cfg))[0] == 1
    # health checks answer without a token (Kubernetes probes)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_can_be_disabled_explicitly(server):
    cfg = GrpcConfig(auth=False)
    port = server(cfg)
    assert list(_score(make_channel(cfg, f"127.0.0.1:{port}")).scores) == [3.0]


def test_missing_token_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KEEL_GRPC_TOKEN", raising=False)
    with pytest.raises(SecurityConfigError, match=r"no token was found in \$KEEL_GRPC_TOKEN"):
        load_token(GrpcConfig())
    with pytest.raises(SecurityConfigError, match="transport.grpc.token_file: cannot read"):
        load_token(GrpcConfig(token_file=str(tmp_path / "nope")))
    (tmp_path / "tok").write_text("from-file\n")
    assert load_token(GrpcConfig(token_file=str(tmp_path / "tok"))) == "from-file"


def test_oversized_message_is_resource_exhausted(server):
    cfg = GrpcConfig(auth=False, max_message_mb=1.0, weight_chunk_mb=0.5)
    port = server(cfg)
    big_client = make_channel(GrpcConfig(auth=False, max_message_mb=8.0, weight_chunk_mb=1.0), f"127.0.0.1:{port}")
    with pytest.raises(grpc.RpcError) as info:
        _score(big_client, size=2 * 2**20)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _make_ca_and_server_cert(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("keel test CA"))
        .issuer_name(name("keel test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"


def test_tls_round_trip_with_a_test_ca(server, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_GRPC_TOKEN", "tls-token")
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    server_cfg = GrpcConfig(tls_cert=str(cert), tls_key=str(key))
    port = server(server_cfg)
    client_cfg = GrpcConfig(tls_ca=str(ca))
    channel = make_channel(client_cfg, f"localhost:{port}")
    assert list(_score(channel, call_metadata(client_cfg)).scores) == [3.0]
    # a client that does not trust the CA cannot talk to it
    plain = make_channel(GrpcConfig(), f"localhost:{port}")
    with pytest.raises(grpc.RpcError) as info:
        _score(plain, call_metadata(client_cfg))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
