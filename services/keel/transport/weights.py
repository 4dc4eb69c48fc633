"""WeightService: versioned policy weights served in bounded, checksummed chunks.

The learner side keeps the last few published versions (`WeightStore`) and serves them
(`WeightServicer`). A fetch is a typed protocol: manifest (names, dtypes, shapes, sizes,
sha256 per tensor), then chunks (each with a CRC-32), then an explicit finish. `fetch_weights`
checks all of it and returns tensors only when every byte arrived intact, so the caller's
update is all-or-nothing: any problem raises `WeightFetchError` and nothing is applied.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import grpc
import torch

from keel.transport.codec import PROTO_TO_TORCH, TORCH_TO_PROTO, DecodeError, tensor_bytes, tensor_from_bytes
from keel.transport.pb import weights_pb2, weights_pb2_grpc

CHECKSUM = "sha256"


class WeightFetchError(RuntimeError):
    """A fetch that did not deliver a complete, intact version. The old weights keep serving."""


@dataclass(frozen=True)
class PublishedVersion:
    manifest: weights_pb2.Manifest
    blobs: list[bytes]  # raw bytes per tensor, in manifest order


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
        if version < 1:
            raise ValueError(f"version must be >= 1, got {version}")
        specs, blobs = [], []
        for name, tensor in state.items():
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
            blobs.append(data)
        num_chunks = sum(max(1, -(-len(b) // self.chunk_bytes)) for b in blobs)
        manifest = weights_pb2.Manifest(
            version=version,
            tensors=specs,
            total_bytes=sum(len(b) for b in blobs),
            chunk_bytes=self.chunk_bytes,
            checksum_algorithm=CHECKSUM,
            num_chunks=num_chunks,
        )
        with self._lock:
            if self._versions and version <= next(reversed(self._versions)):
                raise ValueError(f"version {version} is not newer than {next(reversed(self._versions))}")
            self._versions[version] = PublishedVersion(manifest, blobs)
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


def iter_chunks(published: PublishedVersion):
    """(tensor_index, offset, data) for every chunk of a version; an empty tensor is one empty chunk."""
    size = published.manifest.chunk_bytes
    for i, blob in enumerate(published.blobs):
        if not blob:
            yield i, 0, b""
        for offset in range(0, len(blob), size):
            yield i, offset, blob[offset : offset + size]


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
        count = 0
        for index, offset, data in iter_chunks(published):
            chunk = weights_pb2.Chunk(
                version=version, tensor_index=index, offset=offset, data=data, crc32=zlib.crc32(data)
            )
            yield weights_pb2.FetchResponse(chunk=chunk)
            count += 1
        finish = weights_pb2.Finish(version=version, num_chunks=count, total_bytes=published.manifest.total_bytes)
        yield weights_pb2.FetchResponse(finish=finish)


def fetch_weights(
    stub: weights_pb2_grpc.WeightServiceStub, version: int = 0, timeout: float | None = 60.0, metadata=None
) -> tuple[int, dict[str, torch.Tensor]]:
    """Fetch a version; returns (version, {name: tensor}) only if every check passes."""
    stream = stub.Fetch(weights_pb2.FetchRequest(version=version), timeout=timeout, metadata=metadata)
    manifest = None
    buffers: list[bytearray] = []
    chunks = 0
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "manifest":
                if manifest is not None:
                    raise WeightFetchError("second manifest in one fetch")
                manifest = event.manifest
                buffers = [bytearray() for _ in manifest.tensors]
            elif kind == "chunk":
                if manifest is None:
                    raise WeightFetchError("chunk before the manifest")
                _accept_chunk(manifest, buffers, event.chunk)
                chunks += 1
            elif kind == "finish":
                if manifest is None:
                    raise WeightFetchError("finish before the manifest")
                return manifest.version, _assemble(manifest, buffers, chunks, event.finish)
            else:
                raise WeightFetchError("empty event in the fetch stream")
    except grpc.RpcError as err:
        raise WeightFetchError(f"fetch of version {version} failed: {err.code().name}: {err.details()}") from err
    raise WeightFetchError(f"fetch of version {version} ended without a finish ({chunks} chunks received)")


def _accept_chunk(manifest, buffers: list[bytearray], chunk) -> None:
    if chunk.version != manifest.version:
        raise WeightFetchError(f"chunk of version {chunk.version} in a fetch of version {manifest.version}")
    if not 0 <= chunk.tensor_index < len(buffers):
        raise WeightFetchError(f"chunk for tensor index {chunk.tensor_index}; manifest has {len(buffers)} tensors")
    name = manifest.tensors[chunk.tensor_index].name
    if zlib.crc32(chunk.data) != chunk.crc32:
        raise WeightFetchError(f"corrupt chunk of tensor {name!r} at offset {chunk.offset}: CRC-32 mismatch")
    buf = buffers[chunk.tensor_index]
    if chunk.offset != len(buf):
        raise WeightFetchError(
            f"tensor {name!r}: chunk at offset {chunk.offset}, expected {len(buf)} (missing or reordered)"
        )
    buf.extend(chunk.data)


def _assemble(manifest, buffers: list[bytearray], chunks: int, finish) -> dict[str, torch.Tensor]:
    if finish.num_chunks != chunks or finish.num_chunks != manifest.num_chunks:
        raise WeightFetchError(
            f"received {chunks} chunks; finish says {finish.num_chunks}, manifest {manifest.num_chunks}"
        )
    state = {}
    for spec, buf in zip(manifest.tensors, buffers, strict=True):
        if len(buf) != spec.nbytes:
            raise WeightFetchError(f"tensor {spec.name!r}: {len(buf)} of {spec.nbytes} bytes arrived")
        if hashlib.sha256(buf).hexdigest() != spec.checksum:
            raise WeightFetchError(f"tensor {spec.name!r}: {manifest.checksum_algorithm} mismatch")
        if spec.dtype not in PROTO_TO_TORCH:
            raise WeightFetchError(f"tensor {spec.name!r}: unknown dtype {spec.dtype}")
        try:
            state[spec.name] = tensor_from_bytes(bytes(buf), PROTO_TO_TORCH[spec.dtype], list(spec.shape), spec.name)
        except DecodeError as err:
            raise WeightFetchError(str(err)) from None
    return state
