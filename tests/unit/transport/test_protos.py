"""The committed protobuf code matches protos/, and the contracts carry what the design says."""

import subprocess
import sys
from pathlib import Path

import grpc

from keel.transport.pb import (
    reward_pb2,
    reward_pb2_grpc,
    rollout_pb2,
    tensor_pb2,
    trajectory_pb2,
    weights_pb2,
    weights_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_is_fresh():
    out = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_check_detects_a_stale_file(tmp_path, monkeypatch):
    # Run the checker against a copy of the tree whose proto gained a field.
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    shutil.copytree(ROOT / "services" / "keel" / "transport" / "pb", copy / "services" / "keel" / "transport" / "pb")
    proto = copy / "protos" / "keel" / "v1" / "reward.proto"
    proto.write_text(proto.read_text().replace("string scorer = 3;", "string scorer = 3;\n  int64 extra = 99;"))
    out = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=copy, capture_output=True, text=True)
    assert out.returncode == 1
    assert "reward_pb2.py" in out.stdout


def test_package_and_services():
    assert reward_pb2.DESCRIPTOR.package == "keel.v1"
    services = {
        reward_pb2: ("RewardService", {"Score"}),
        weights_pb2: ("WeightService", {"GetManifest", "Fetch"}),
        trajectory_pb2: ("TrajectoryService", {"Push", "Pull"}),
        rollout_pb2: ("RolloutService", {"Generate", "UpdateWeights", "Status"}),
    }
    for module, (name, methods) in services.items():
        service = module.DESCRIPTOR.services_by_name[name]
        assert {m.name for m in service.methods} == methods


def test_fetch_streams_manifest_chunks_finish():
    fetch = weights_pb2.DESCRIPTOR.services_by_name["WeightService"].methods_by_name["Fetch"]
    assert fetch.server_streaming and not fetch.client_streaming
    event = weights_pb2.FetchResponse(
        chunk=weights_pb2.Chunk(version=3, tensor_index=1, offset=8, data=b"abc", crc32=7)
    )
    assert event.WhichOneof("event") == "chunk"
    push = trajectory_pb2.DESCRIPTOR.services_by_name["TrajectoryService"].methods_by_name["Push"]
    assert push.client_streaming and push.server_streaming


def test_messages_round_trip():
    batch = trajectory_pb2.TrajectoryBatch(
        rollout_id="r1",
        weight_version=4,
        prompt_ids=["p0", "p1"],
        response_tokens=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[2, 3], data=bytes(24)),
    )
    again = trajectory_pb2.TrajectoryBatch.FromString(batch.SerializeToString())
    assert again == batch and list(again.response_tokens.shape) == [2, 3]


def test_generated_stubs_serve_over_loopback():
    """A real grpc server on 127.0.0.1 answers through the generated stub."""
    from concurrent import futures

    class Echo(reward_pb2_grpc.RewardServiceServicer):
        def Score(self, request, context):
            return reward_pb2.ScoreResponse(
                request_id=request.request_id, scores=[len(s.response) for s in request.samples]
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            reply = stub.Score(
                reward_pb2.ScoreRequest(
                    request_id="q",
                    samples=[reward_pb2.ScoreSample(response="abc"), reward_pb2.ScoreSample(response="")],
                ),
                timeout=10,
            )
        assert reply.request_id == "q" and list(reply.scores) == [3.0, 0.0]
        assert hasattr(weights_pb2_grpc, "WeightServiceStub")
    finally:
        server.stop(None)
