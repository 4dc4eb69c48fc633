"""WeightService over a real gRPC server on 127.0.0.1: chunked, checksummed, all-or-nothing."""

from __future__ import annotations

import grpc
import pytest
import torch

from keel.transport.pb import tensor_pb2, weights_pb2, weights_pb2_grpc
from keel.transport.weights import WeightFetchError, WeightServicer, WeightStore, fetch_weights


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "counter": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture
def serve(weight_address):
    """start(servicer) -> a stub of that WeightService."""
    return lambda servicer: weights_pb2_grpc.WeightServiceStub(grpc.insecure_channel(weight_address(servicer)))


def test_round_trip_in_many_small_chunks(serve):
    store = WeightStore(keep=2, chunk_bytes=100)
    manifest = store.publish(1, _state())
    assert manifest.num_chunks == 32 + 1 + 1 + 1  # 3200 B / 100 + 32 B + 24 B + the empty tensor
    assert [t.name for t in manifest.tensors] == list(_state())
    stub = serve(WeightServicer(store))
    assert stub.GetManifest(weights_pb2.ManifestRequest(version=0), timeout=10) == manifest
    version, state = fetch_weights(stub, 1, timeout=10)
    assert version == 1
    for name, tensor in _state().items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


def test_latest_and_evicted_versions(serve):
    store = WeightStore(keep=2, chunk_bytes=1024)
    for v in (1, 2, 3):
        store.publish(v, _state(v))
    stub = serve(WeightServicer(store))
    version, state = fetch_weights(stub, 0, timeout=10)
    assert version == 3 and torch.equal(state["embed.weight"], _state(3)["embed.weight"])
    with pytest.raises(grpc.RpcError) as info:
        stub.GetManifest(weights_pb2.ManifestRequest(version=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "held: [2, 3]" in info.value.details()
    with pytest.raises(WeightFetchError, match="NOT_FOUND"):
        fetch_weights(stub, 1, timeout=10)
    with pytest.raises(ValueError, match="not newer"):
        store.publish(3, _state())


class Tampering(WeightServicer):
    """Serves a version but breaks the stream in one of several ways."""

    def __init__(self, store, how):
        super().__init__(store)
        self.how = how

    def Fetch(self, request, context):
        events = list(super().Fetch(request, context))
        if self.how == "flip":
            chunk = events[2].chunk
            data = bytearray(chunk.data)
            data[0] ^= 0xFF
            events[2] = weights_pb2.FetchResponse(chunk=weights_pb2.Chunk(**{**_fields(chunk), "data": bytes(data)}))
        elif self.how == "drop":
            del events[3]
        elif self.how == "truncate":
            events = events[:-1]
        elif self.how == "checksum":
            events[0].manifest.tensors[0].checksum = "0" * 64
        yield from events


def _fields(chunk):
    return {f.name: getattr(chunk, f.name) for f in chunk.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    "how, message",
    [
        ("flip", "corrupt chunk of tensor 'embed.weight' at offset 100: CRC-32 mismatch"),
        ("drop", "chunk at offset 300, expected 200"),
        ("truncate", "ended without a finish"),
        ("checksum", "tensor 'embed.weight': sha256 mismatch"),
    ],
)
def test_damaged_stream_is_refused_and_nothing_is_applied(serve, how, message, tiny_model_dir):
    from keel.config import ModelConfig, RolloutConfig
    from keel.rollout.worker import RolloutWorker

    store = WeightStore(chunk_bytes=100)
    store.publish(1, _state())
    stub = serve(Tampering(store, how))
    with pytest.raises(WeightFetchError, match=message):
        fetch_weights(stub, 1, timeout=10)

    # The same with a real model's weights and a worker: the worker keeps serving version 0.
    worker = RolloutWorker(ModelConfig(policy=str(tiny_model_dir)), RolloutConfig(backend="hf"), 64, seed=0)
    before = {k: v.clone() for k, v in worker.generator.model.state_dict().items()}
    model_store = WeightStore(chunk_bytes=4096)
    model_store.publish(1, {k: v * 2 for k, v in before.items()})
    model_stub = serve(Tampering(model_store, how))
    with pytest.raises(WeightFetchError):
        version, state = fetch_weights(model_stub, 1, timeout=10)
        worker.update_weights(state, version)
    assert worker.weight_version == 0
    after = worker.generator.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- lying manifests

GiB = 2**30


class LyingManifest(WeightServicer):
    """Serves a real version's chunks under a manifest that `lie` edits."""

    def __init__(self, store, lie):
        super().__init__(store)
        self.lie = lie

    def Fetch(self, request, context):
        events = list(super().Fetch(request, context))
        manifest = weights_pb2.Manifest()
        manifest.CopyFrom(events[0].manifest)
        self.lie(manifest)
        yield weights_pb2.FetchResponse(manifest=manifest)
        yield from events[1:]


def _claim_nbytes(m):  # 256 MiB for a (50, 16) float32 tensor; the total agrees with the lie
    m.total_bytes += 2**28 - m.tensors[0].nbytes
    m.tensors[0].nbytes = 2**28


def _claim_100gb(m):  # a consistent manifest for a model of 100 GB
    m.tensors[0].shape[:] = [100 * GiB // 64, 16]
    m.total_bytes += 100 * GiB - m.tensors[0].nbytes
    m.tensors[0].nbytes = 100 * GiB


def _extra_tensor(m):
    m.tensors.add(name="evil", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2**26], nbytes=2**28)
    m.total_bytes += 2**28


def _other_dtype(m):
    m.tensors[0].dtype = tensor_pb2.DTYPE_FLOAT64
    m.total_bytes += m.tensors[0].nbytes
    m.tensors[0].nbytes *= 2


def _claim_total(m):
    m.total_bytes = 100 * GiB


def _lack_tensor(m):
    m.total_bytes -= m.tensors[1].nbytes
    del m.tensors[1]


@pytest.mark.parametrize(
    "lie, with_specs, message",
    [
        (_claim_nbytes, False, r"'embed.weight' claims 268435456 bytes; shape \(50, 16\) of torch.float32 is 3200"),
        (_claim_total, False, r"total_bytes 107374182400, its tensors sum to 3256"),
        (_claim_100gb, True, r"'embed.weight' is \(1677721600, 16\) of torch.float32, expected \(50, 16\) of"),
        (_extra_tensor, True, r"has unknown tensor 'evil'"),
        (_other_dtype, True, r"'embed.weight' is \(50, 16\) of torch.float64, expected \(50, 16\) of torch.float32"),
        (_lack_tensor, True, r"lacks tensor 'norm.weight'"),
    ],
)
def test_a_lying_manifest_is_refused_before_anything_is_allocated(weight_address, lie, with_specs, message):
    import tracemalloc

    from keel.config import GrpcConfig
    from keel.transport.weights import WeightClient

    store = WeightStore(chunk_bytes=1024)
    store.publish(1, _state())
    specs = {name: (tuple(t.shape), t.dtype) for name, t in _state().items()}
    address = weight_address(LyingManifest(store, lie))
    client = WeightClient(GrpcConfig(auth=False, retries=0), address, **({"expected": specs} if with_specs else {}))
    tracemalloc.start()
    try:
        with pytest.raises(WeightFetchError, match=message):
            client.fetch(1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak} bytes allocated while fetching a {store.get(1).manifest.total_bytes}-byte model"


def test_a_client_with_the_workers_specs_fetches_an_honest_version(weight_address):
    from keel.config import GrpcConfig
    from keel.transport.weights import WeightClient

    store = WeightStore(chunk_bytes=1024)
    store.publish(1, _state())
    specs = {name: (tuple(t.shape), t.dtype) for name, t in _state().items()}
    version, state = WeightClient(GrpcConfig(auth=False), weight_address(WeightServicer(store)), expected=specs).fetch()
    assert version == 1 and all(torch.equal(state[k], v) for k, v in _state().items())
