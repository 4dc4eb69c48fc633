"""WeightService: versioned policy weights served in bounded, checksummed chunks.

The learner side keeps the last few published versions (`WeightStore`) and serves them
(`WeightServicer`). A fetch is a typed protocol: manifest (names, dtypes, shapes, sizes,
sha256 per tensor), then chunks (each with a CRC-32), then an explicit finish. `fetch_weights`
checks all of it and returns tensors only when every byte arrived intact, so the caller's
update is all-or-nothing: any problem raises `WeightFetchError` and nothing is applied.
The manifest is checked before anything is allocated for it (`check_manifest`): a sender cannot
make the receiver reserve memory its model does not need.
"""

from __future__ import annotations

import hashlib
import math
import threading
import zlib
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import torch

from keel.config import GrpcConfig
from keel.transport.codec import PROTO_TO_TORCH, TORCH_TO_PROTO, DecodeError, tensor_bytes, tensor_from_bytes
from keel.transport.pb import weights_pb2, weights_pb2_grpc
from keel.transport.security import GrpcClient, add_servicer

CHECKSUM = "sha256"
SERVICE = weights_pb2.DESCRIPTOR.services_by_name["WeightService"]
# What a receiver expects: tensor name -> (shape, dtype), e.g. a rollout generator's weight_specs().
WeightSpecs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class WeightFetchError(RuntimeError):
    """A fetch that did not deliver a complete, intact version. The old weights keep serving."""


@dataclass(frozen=True)
class StoredChunk:
    tensor_index: int
    offset: int
    data: bytes
    crc32: int


@dataclass(frozen=True)
class PublishedVersion:
    manifest: weights_pb2.Manifest
    chunks: list[StoredChunk]  # every chunk of a Fetch, in stream order; sliced and checksummed once


class WeightStore:
    """The last `keep` published versions, thread-safe. Older versions are evicted."""

    def __init__(self, keep: int = 2, chunk_bytes: int = 4 * 2**20):
        if keep < 1 or chunk_bytes < 1:
            raise ValueError("keep and chunk_bytes must be >= 1")
        self.keep = keep
        self.chunk_bytes = chunk_bytes
        self._versions: OrderedDict[int, PublishedVersion] = OrderedDict()
        self._lock = threading.Lock()

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> weights_pb2.Manifest:
        """Snapshot `state` as `version`: raw bytes in chunks with their CRC-32, a sha256 per tensor."""
        if version < 1:
            raise ValueError(f"version must be >= 1, got {version}")
        specs, chunks, total = [], [], 0
        for index, (name, tensor) in enumerate(state.items()):
            data = tensor_bytes(tensor)
            specs.append(
                weights_pb2.TensorSpec(
                    name=name,
                    dtype=TORCH_TO_PROTO[tensor.dtype],
                    shape=list(tensor.shape),
                    nbytes=len(data),
                    checksum=hashlib.sha256(data).hexdigest(),
                )
            )
            total += len(data)
            chunks.extend(_slice(index, data, self.chunk_bytes))
        manifest = weights_pb2.Manifest(
            version=version,
            tensors=specs,
            total_bytes=total,
            chunk_bytes=self.chunk_bytes,
            checksum_algorithm=CHECKSUM,
            num_chunks=len(chunks),
        )
        with self._lock:
            if self._versions and version <= next(reversed(self._versions)):
                raise ValueError(f"version {version} is not newer than {next(reversed(self._versions))}")
            self._versions[version] = PublishedVersion(manifest, chunks)
            while len(self._versions) > self.keep:
                self._versions.popitem(last=False)
        return manifest

    def get(self, version: int) -> PublishedVersion | None:
        """The version asked for (0 = the latest), or None when unknown or evicted."""
        with self._lock:
            if not self._versions:
                return None
            if version == 0:
                return self._versions[next(reversed(self._versions))]
            return self._versions.get(version)

    def versions(self) -> list[int]:
        with self._lock:
            return list(self._versions)


def _slice(index: int, data: bytes, size: int) -> list[StoredChunk]:
    """A tensor's bytes as chunks of at most `size`; an empty tensor is one empty chunk."""
    if not data:
        return [StoredChunk(index, 0, b"", zlib.crc32(b""))]
    view = memoryview(data)
    out = []
    for offset in range(0, len(data), size):
        piece = bytes(view[offset : offset + size])
        out.append(StoredChunk(index, offset, piece, zlib.crc32(piece)))
    return out


class WeightServicer(weights_pb2_grpc.WeightServiceServicer):
    def __init__(self, store: WeightStore):
        self.store = store

    def _lookup(self, version: int, context) -> PublishedVersion:
        published = self.store.get(version)
        if published is None:
            held = self.store.versions()
            context.abort(grpc.StatusCode.NOT_FOUND, f"weight version {version} is not held (held: {held})")
        return published

    def GetManifest(self, request, context):
        return self._lookup(request.version, context).manifest

    def Fetch(self, request, context):
        published = self._lookup(request.version, context)
        version = published.manifest.version
        yield weights_pb2.FetchResponse(manifest=published.manifest)
        for c in published.chunks:
            chunk = weights_pb2.Chunk(
                version=version, tensor_index=c.tensor_index, offset=c.offset, data=c.data, crc32=c.crc32
            )
            yield weights_pb2.FetchResponse(chunk=chunk)
        finish = weights_pb2.Finish(
            version=version, num_chunks=len(published.chunks), total_bytes=published.manifest.total_bytes
        )
        yield weights_pb2.FetchResponse(finish=finish)


def fetch_weights(
    stub: weights_pb2_grpc.WeightServiceStub,
    version: int = 0,
    timeout: float | None = 60.0,
    metadata=None,
    expected: WeightSpecs | None = None,
) -> tuple[int, dict[str, torch.Tensor]]:
    """Fetch a version; returns (version, {name: tensor}) only if every check passes. With
    `expected`, the manifest must describe exactly those tensors (see check_manifest)."""
    stream = stub.Fetch(weights_pb2.FetchRequest(version=version), timeout=timeout, metadata=metadata)
    assembly: _Assembly | None = None
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "manifest":
                if assembly is not None:
                    raise WeightFetchError("second manifest in one fetch")
                check_manifest(event.manifest, expected)
                assembly = _Assembly(event.manifest)
            elif kind == "chunk":
                if assembly is None:
                    raise WeightFetchError("chunk before the manifest")
                assembly.add(event.chunk)
            elif kind == "finish":
                if assembly is None:
                    raise WeightFetchError("finish before the manifest")
                return assembly.manifest.version, assembly.finish(event.finish)
            else:
                raise WeightFetchError("empty event in the fetch stream")
    except grpc.RpcError as err:
        raise WeightFetchError(f"fetch of version {version} failed: {err.code().name}: {err.details()}") from err
    received = assembly.chunks if assembly else 0
    raise WeightFetchError(f"fetch of version {version} ended without a finish ({received} chunks received)")


def check_manifest(manifest: weights_pb2.Manifest, expected: WeightSpecs | None = None) -> None:
    """Refuse a manifest before anything is allocated for it (raises WeightFetchError).

    Always: names unique, dtypes known, each tensor's nbytes = prod(shape) * itemsize, and
    total_bytes their sum. With the receiver's `expected` specs: the same names, shapes and
    dtypes, so the total is the receiver's model size.
    """
    v = manifest.version
    names = [spec.name for spec in manifest.tensors]
    repeated = [name for name, n in Counter(names).items() if n > 1]
    if repeated:
        raise WeightFetchError(f"manifest of version {v}: tensor {repeated[0]!r} listed twice")
    total = 0
    for spec in manifest.tensors:
        if spec.dtype not in PROTO_TO_TORCH:
            raise WeightFetchError(f"manifest of version {v}: tensor {spec.name!r} has unknown dtype {spec.dtype}")
        shape, dtype = tuple(spec.shape), PROTO_TO_TORCH[spec.dtype]
        if any(d < 0 for d in shape):
            raise WeightFetchError(f"manifest of version {v}: tensor {spec.name!r} has negative shape {shape}")
        size = math.prod(shape) * dtype.itemsize
        if spec.nbytes != size:
            raise WeightFetchError(
                f"manifest of version {v}: tensor {spec.name!r} claims {spec.nbytes} bytes; "
                f"shape {shape} of {dtype} is {size}"
            )
        total += size
    if manifest.total_bytes != total:
        raise WeightFetchError(
            f"manifest of version {v}: total_bytes {manifest.total_bytes}, its tensors sum to {total}"
        )
    if expected is None:
        return
    model_bytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values())
    missing, unknown = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or unknown:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has unknown tensor {unknown[0]!r}"
        raise WeightFetchError(f"manifest of version {v} {what} ({len(missing)} missing, {len(unknown)} unknown)")
    for spec in manifest.tensors:
        got, want = (tuple(spec.shape), PROTO_TO_TORCH[spec.dtype]), expected[spec.name]
        if got != (tuple(want[0]), want[1]):
            raise WeightFetchError(
                f"manifest of version {v}: tensor {spec.name!r} is {got[0]} of {got[1]}, "
                f"expected {tuple(want[0])} of {want[1]}"
            )
    if total != model_bytes:  # implied by the checks above; kept as the statement of the bound
        raise WeightFetchError(f"manifest of version {v} totals {total} bytes; the model is {model_bytes}")


class _Assembly:
    """One fetch being put together: each tensor's bytes land in a buffer sized by the (checked) manifest,
    and its sha256 is updated as chunks arrive (hashing overlaps the transfer: hashlib and zlib
    release the GIL), so the tensors come out of the buffers without another copy."""

    def __init__(self, manifest: weights_pb2.Manifest):
        self.manifest = manifest
        self.buffers = [bytearray(spec.nbytes) for spec in manifest.tensors]
        self.filled = [0] * len(manifest.tensors)
        self.hashes = [hashlib.sha256() for _ in manifest.tensors]
        self.chunks = 0

    def add(self, chunk: weights_pb2.Chunk) -> None:
        manifest = self.manifest
        if chunk.version != manifest.version:
            raise WeightFetchError(f"chunk of version {chunk.version} in a fetch of version {manifest.version}")
        i = chunk.tensor_index
        if not 0 <= i < len(self.buffers):
            raise WeightFetchError(f"chunk for tensor index {i}; manifest has {len(self.buffers)} tensors")
        name, data = manifest.tensors[i].name, chunk.data
        if zlib.crc32(data) != chunk.crc32:
            raise WeightFetchError(f"corrupt chunk of tensor {name!r} at offset {chunk.offset}: CRC-32 mismatch")
        start = self.filled[i]
        if chunk.offset != start:
            raise WeightFetchError(
                f"tensor {name!r}: chunk at offset {chunk.offset}, expected {start} (missing or reordered)"
            )
        end = start + len(data)
        if end > len(self.buffers[i]):
            raise WeightFetchError(f"tensor {name!r}: more than the {len(self.buffers[i])} bytes the manifest says")
        self.buffers[i][start:end] = data
        self.hashes[i].update(data)
        self.filled[i] = end
        self.chunks += 1

    def finish(self, finish: weights_pb2.Finish) -> dict[str, torch.Tensor]:
        manifest = self.manifest
        if finish.num_chunks != self.chunks or finish.num_chunks != manifest.num_chunks:
            raise WeightFetchError(
                f"received {self.chunks} chunks; finish says {finish.num_chunks}, manifest {manifest.num_chunks}"
            )
        state = {}
        for spec, buf, filled, digest in zip(manifest.tensors, self.buffers, self.filled, self.hashes, strict=True):
            if filled != spec.nbytes:
                raise WeightFetchError(f"tensor {spec.name!r}: {filled} of {spec.nbytes} bytes arrived")
            if digest.hexdigest() != spec.checksum:
                raise WeightFetchError(f"tensor {spec.name!r}: {manifest.checksum_algorithm} mismatch")
            if spec.dtype not in PROTO_TO_TORCH:
                raise WeightFetchError(f"tensor {spec.name!r}: unknown dtype {spec.dtype}")
            try:
                state[spec.name] = tensor_from_bytes(buf, PROTO_TO_TORCH[spec.dtype], list(spec.shape), spec.name)
            except DecodeError as err:
                raise WeightFetchError(str(err)) from None
        return state


class WeightServiceUnavailable(WeightFetchError):
    """The WeightService could not be reached within the retry budget."""


class WeightPublisher:
    """The learner's side: a WeightStore served by a WeightService (with health) from this process."""

    def __init__(self, cfg: GrpcConfig):
        from keel.transport.security import serve

        self.store = WeightStore(keep=cfg.weight_versions_kept, chunk_bytes=int(cfg.weight_chunk_mb * 2**20))
        servicer = WeightServicer(self.store)
        self._server, self.port, self.address = serve(
            cfg, cfg.weight_port, lambda server: add_servicer(server, SERVICE, servicer)
        )

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> weights_pb2.Manifest:
        return self.store.publish(version, state)

    def stop(self, grace_s: float | None = None) -> None:
        self._server.stop(grace_s)


class WeightClient(GrpcClient):
    """The rollout side: fetches versions from a WeightService with deadlines and retries. Given
    the worker's `expected` specs (name -> (shape, dtype)), a manifest that does not describe
    exactly those tensors is refused before anything is allocated."""

    def __init__(self, cfg: GrpcConfig, address: str, base_delay_s: float = 0.1, expected: WeightSpecs | None = None):
        super().__init__(cfg, address, weights_pb2_grpc.WeightServiceStub, base_delay_s)
        self.expected = expected

    def fetch(self, version: int = 0) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, tensors), every check passed; WeightFetchError otherwise (nothing to apply)."""
        from keel.transport.retry import call_with_retries

        def fetch():
            return fetch_weights(
                self._stub, version, timeout=self.cfg.deadline_s, metadata=self._metadata, expected=self.expected
            )

        return call_with_retries(
            fetch,
            self.cfg.retries,
            f"weight service {self.address}",
            self.base_delay_s,
            WeightServiceUnavailable,
        )
