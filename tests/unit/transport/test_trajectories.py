"""TrajectoryService over a real gRPC server on 127.0.0.1: dedupe by rollout id, staleness with a
reason, malformed batches refused naming the field, auth, and pushes that survive a restart."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from keel.config import GrpcConfig
from keel.controller.actors import free_port
from keel.trajectory import Trajectories
from keel.transport.codec import tensor_to_proto, trajectories_to_proto
from keel.transport.pb import trajectory_pb2, trajectory_pb2_grpc
from keel.transport.retry import Unavailable, call_with_retries
from keel.transport.security import call_metadata, make_channel
from keel.transport.trajectories import TrajectoryInbox, TrajectoryPusher, TrajectoryServer, TrajectoryServicer

TOKEN = "traj-t0ken"


def _traj(rollout_id: str, version: int, B: int = 3, R: int = 4) -> Trajectories:
    g = torch.Generator().manual_seed(hash(rollout_id) % 1000)
    return Trajectories(
        rollout_id=rollout_id,
        weight_version=version,
        prompt_ids=[f"p{i // 2}" for i in range(B)],
        sample_index=[i % 2 for i in range(B)],
        prompt_tokens=torch.randint(0, 50, (B, 2), generator=g),
        prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_tokens=torch.randint(0, 50, (B, R), generator=g),
        response_mask=torch.ones(B, R, dtype=torch.bool),
        behaviour_logprobs=-torch.rand(B, R, generator=g),
        prompts=[""] * B,
        responses=[f"r{i}" for i in range(B)],
    )


@pytest.fixture
def service(monkeypatch):
    monkeypatch.setenv("KEEL_GRPC_TOKEN", TOKEN)
    servers = []

    def start(max_staleness=1, port=0, vocab_size=None, **grpc):
        cfg = GrpcConfig(trajectory_port=port, **{"deadline_s": 10, **grpc})
        server = TrajectoryServer(TrajectoryInbox(max_staleness), cfg, vocab_size)
        servers.append(server)
        return server, cfg

    yield start
    for s in servers:
        s.stop(0)


def test_accepts_once_refuses_stale_and_ahead_with_reasons(service):
    server, cfg = service(max_staleness=1)
    server.inbox.set_version(5)
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(make_channel(cfg, server.address))
    batches = [_traj("a", 5), _traj("b", 4), _traj("c", 3), _traj("d", 6), _traj("a", 5)]
    messages = iter([trajectories_to_proto(b) for b in batches])
    acks = list(stub.Push(messages, timeout=10, metadata=call_metadata(cfg)))
    assert [(a.rollout_id, a.accepted, a.reason) for a in acks] == [
        ("a", True, ""),
        ("b", True, ""),
        ("c", False, "stale: version 3 < 5 - 1"),
        ("d", False, "ahead: version 6 > learner version 5"),
        ("a", False, "duplicate"),
    ]
    assert all(a.learner_version == 5 for a in acks)
    # pushed again later: still once
    [again] = TrajectoryPusher(cfg, server.address, "w0").push([_traj("b", 5)])
    assert not again.accepted and again.reason == "duplicate"
    taken = server.inbox.take(["b", "a"], timeout_s=1)
    assert [t.rollout_id for t in taken] == ["b", "a"]
    want = _traj("a", 5)
    assert torch.equal(taken[1].response_tokens, want.response_tokens)
    assert torch.equal(taken[1].behaviour_logprobs, want.behaviour_logprobs)
    assert taken[1].responses == want.responses and taken[1].sample_index == want.sample_index
    assert len(server.inbox) == 0


def test_pull_streams_fresh_batches_and_drops_old_ones(service):
    server, cfg = service(max_staleness=3, trajectory_pull_streams=1)
    server.inbox.set_version(3)
    TrajectoryPusher(cfg, server.address).push([_traj("old", 1), _traj("new", 3), _traj("newer", 3)])
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(make_channel(cfg, server.address))
    request = trajectory_pb2.PullRequest(consumer_id="c", max_batches=5, min_version=2)
    pulled = list(stub.Pull(request, timeout=10, metadata=call_metadata(cfg)))
    assert [b.rollout_id for b in pulled] == ["new", "newer"]
    assert server.inbox.stats.dropped == 1
    # nothing queued: waits wait_ms, then returns an empty stream
    empty = trajectory_pb2.PullRequest(max_batches=1, wait_ms=50)
    assert list(stub.Pull(empty, timeout=10, metadata=call_metadata(cfg))) == []
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(trajectory_pb2.PullRequest(max_batches=0), timeout=10, metadata=call_metadata(cfg)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_batches" in info.value.details()


def _malformed(kind: str) -> trajectory_pb2.TrajectoryBatch:
    msg = trajectories_to_proto(_traj("bad", 0))
    if kind == "shape":
        msg.response_mask.CopyFrom(tensor_to_proto(torch.ones(3, 5, dtype=torch.bool)))
    elif kind == "dtype":
        msg.behaviour_logprobs.CopyFrom(tensor_to_proto(torch.zeros(3, 4, dtype=torch.float64)))
    elif kind == "bytes":
        msg.prompt_tokens.data = msg.prompt_tokens.data[:-4]
    elif kind == "lengths":
        del msg.prompt_ids[-1]
    elif kind == "vocab":
        msg.response_tokens.CopyFrom(tensor_to_proto(torch.full((3, 4), 50, dtype=torch.int32)))
    elif kind == "logprobs":
        msg.behaviour_logprobs.CopyFrom(tensor_to_proto(torch.full((3, 4), float("nan"))))
    return msg


@pytest.mark.parametrize(
    "kind, field",
    [
        ("shape", "response_mask: shape (3, 5), expected (3, 4)"),
        ("dtype", "behaviour_logprobs: dtype torch.float64, expected torch.float32"),
        ("bytes", "prompt_tokens: 20 bytes for shape [3, 2]"),
        ("lengths", "prompt_ids: 2 entries for 3 samples"),
        ("vocab", "response_tokens: token id 50 at [0, 0] is outside the vocabulary [0, 50)"),
        ("logprobs", "behaviour_logprobs: nan at [0, 0] is not finite"),
    ],
)
def test_malformed_batch_is_invalid_argument_naming_the_field(service, kind, field):
    server, cfg = service(vocab_size=50)
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(make_channel(cfg, server.address))
    good = trajectories_to_proto(_traj("good", 0))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Push(iter([good, _malformed(kind)]), timeout=10, metadata=call_metadata(cfg)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("batch bad: ") and field in info.value.details()
    # what came before the bad batch was accepted; the bad one left nothing behind
    assert [t.rollout_id for t in server.inbox.take(["good"], 1)] == ["good"]
    assert len(server.inbox) == 0


def test_push_needs_the_token(service):
    server, cfg = service()
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(make_channel(cfg, server.address))
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Push(iter([trajectories_to_proto(_traj("x", 0))]), timeout=10, metadata=metadata))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(server.inbox) == 0


def test_pusher_waits_for_a_late_server_and_gives_up_clearly(service):
    port = free_port()
    cfg = GrpcConfig(trajectory_port=port, retries=6, deadline_s=5)
    threading.Timer(0.5, lambda: service(port=port)).start()
    pusher = TrajectoryPusher(cfg, f"127.0.0.1:{port}", base_delay_s=0.2)
    [ack] = pusher.push([_traj("late", 0)])
    assert ack.accepted

    dead = TrajectoryPusher(GrpcConfig(retries=2, deadline_s=1), f"127.0.0.1:{free_port()}", base_delay_s=0.01)
    with pytest.raises(Unavailable, match=r"trajectory service .*UNAVAILABLE after 3 attempt\(s\)"):
        dead.push([_traj("lost", 0)])


class LosesFirstAck(TrajectoryServicer):
    """Takes the first pushed batch into the inbox, then drops the connection before acking it."""

    def __init__(self, inbox):
        super().__init__(inbox)
        self.calls = 0

    def Push(self, request_iterator, context):
        self.calls += 1
        if self.calls == 1:
            from keel.transport.codec import trajectories_from_proto

            self.inbox.offer(trajectories_from_proto(next(iter(request_iterator))))
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
        yield from super().Push(request_iterator, context)


def test_a_retry_after_a_lost_ack_delivers_exactly_once(monkeypatch):
    from keel.transport.security import make_server

    monkeypatch.setenv("KEEL_GRPC_TOKEN", TOKEN)
    cfg = GrpcConfig(retries=3, deadline_s=5)
    inbox = TrajectoryInbox()
    server, port = make_server(cfg)
    trajectory_pb2_grpc.add_TrajectoryServiceServicer_to_server(LosesFirstAck(inbox), server)
    server.start()
    try:
        acks = TrajectoryPusher(cfg, f"127.0.0.1:{port}", base_delay_s=0.01).push([_traj("one", 0), _traj("two", 0)])
    finally:
        server.stop(0)
    assert [a.accepted for a in acks] == [True, True]
    assert acks[0].reason == "delivered by an earlier attempt"
    assert [t.rollout_id for t in inbox.pull(10)] == ["one", "two"]  # each exactly once


def test_call_with_retries_only_retries_unavailable():
    calls = []

    class Err(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "down"

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Err(grpc.StatusCode.UNAVAILABLE)
        return "ok"

    assert call_with_retries(flaky, retries=5, what="x", base_delay_s=0.001) == "ok" and len(calls) == 3
    calls.clear()

    def broken():
        calls.append(1)
        raise Err(grpc.StatusCode.INTERNAL)

    with pytest.raises(Err):  # not retried
        call_with_retries(broken, retries=5, what="x")
    assert len(calls) == 1

    def wrapped():  # an error raised *from* an UNAVAILABLE RpcError counts as UNAVAILABLE
        try:
            raise Err(grpc.StatusCode.UNAVAILABLE)
        except Err as err:
            raise RuntimeError("fetch failed") from err

    with pytest.raises(Unavailable, match=r"x: UNAVAILABLE after 2 attempt\(s\): fetch failed"):
        call_with_retries(wrapped, retries=1, what="x", base_delay_s=0.001)


# --------------------------------------------------------------------------- hostile callers


def test_undecodable_push_is_invalid_argument(service):
    server, cfg = service()
    push = make_channel(cfg, server.address).stream_stream("/keel.v1.TrajectoryService/Push")
    good = trajectories_to_proto(_traj("good", 0)).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        list(push(iter([good, b"\xff\xff\xff\xff"]), timeout=10, metadata=call_metadata(cfg)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request: the bytes are not a valid keel.v1.TrajectoryBatch"
    assert [t.rollout_id for t in server.inbox.take(["good"], 1)] == ["good"]


def test_the_inbox_is_bounded_and_says_so(service):
    from keel.transport.trajectories import held_bytes

    size = held_bytes(_traj("a", 0))
    server, cfg = service(trajectory_inbox_mb=(2.5 * size) / 2**20)  # room for two batches
    pusher = TrajectoryPusher(cfg, server.address)
    acks = pusher.push([_traj("a", 0), _traj("b", 0), _traj("c", 0)])
    assert [a.accepted for a in acks] == [True, True, False]
    assert acks[2].reason == f"full: {2 * size} bytes queued, this batch {size}, bound {int(2.5 * size)}"
    assert len(server.inbox) == 2 and server.inbox.stats.full == 1
    server.inbox.take(["a"], timeout_s=1)  # the learner took one: there is room again
    [again] = pusher.push([_traj("c", 0)])
    assert again.accepted and [t.rollout_id for t in server.inbox.take(["b", "c"], 1)] == ["b", "c"]


def test_pull_is_off_unless_configured(service):
    server, cfg = service()
    TrajectoryPusher(cfg, server.address).push([_traj("a", 0)])
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(make_channel(cfg, server.address))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(trajectory_pb2.PullRequest(max_batches=1), timeout=10, metadata=call_metadata(cfg)))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "trajectory_pull_streams" in info.value.details()
    assert len(server.inbox) == 1  # nothing was taken


def test_pullers_cannot_starve_push(service):
    server, cfg = service(trajectory_pull_streams=2, deadline_s=2)
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(make_channel(cfg, server.address))
    forever = trajectory_pb2.PullRequest(max_batches=1, wait_ms=3_600_000)

    def pull():
        try:
            return len(list(stub.Pull(forever, timeout=30, metadata=call_metadata(cfg))))
        except grpc.RpcError as err:
            return err.code()

    began = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        pulls = [pool.submit(pull) for _ in range(20)]  # far more than the server's 8 Push threads
        time.sleep(1.0)
        pushed = time.monotonic()
        [ack] = TrajectoryPusher(cfg, server.address).push([_traj("x", 0)])
        assert ack.accepted and time.monotonic() - pushed < 1.0
        results = [p.result(timeout=30) for p in pulls]
    assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 18  # at most 2 Pull streams at once
    # one stream took the batch; the other waited deadline_s (not the hour it asked for), then ended
    assert sorted(r for r in results if isinstance(r, int)) == [0, 1]
    assert time.monotonic() - began < 8
