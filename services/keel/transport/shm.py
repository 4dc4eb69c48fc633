"""Weights handed to rollout workers on the learner's node through one shared-memory buffer.

Learner rank 0 keeps an anonymous memory file (`memfd_create`) the size of the rollout's weights.
Publishing version v writes each tensor into it once (the cast to the rollout's dtype is that
same pass), then v into its header. A worker on the same node opens the file through
`/proc/<pid>/fd/<fd>`, maps it read-only, checks that the header holds v, and loads the tensors
straight from the mapping into its own weights: two passes over the bytes instead of the object
store's put, serialisation and get. The memory is the learner process's own: when that process
dies the kernel frees it, so a killed learner leaves nothing behind in /dev/shm.

The controller never overwrites a version while a worker reads it: a publish waits for every
worker to apply it before the next step starts, and a worker added later reads between steps.
Workers on another node (a handle names its node) take the object-store path instead.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import torch

_HEADER = struct.Struct("<8sq")  # magic, version
_MAGIC = b"keelwts1"
_ALIGN = 64


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SharedHandle:
    """What a worker needs to map version `version` (small: it travels in the actor call)."""

    node_id: str
    pid: int
    fd: int
    size: int
    version: int
    slots: tuple[TensorSlot, ...]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


class SharedWeights:
    """The writer side, on learner rank 0."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.fd = os.memfd_create("keel-weights", 0)
        self.size = 0
        self._map: mmap.mmap | None = None
        self._slots: tuple[TensorSlot, ...] = ()

    def write(self, version: int, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> SharedHandle:
        """Write `state` (floating tensors cast to `dtype`; None: each in its own) as `version`; returns its handle."""
        slots = self._layout(state, dtype)
        header = memoryview(self._map)[: _HEADER.size]
        header[:] = _HEADER.pack(_MAGIC, -1)  # a reader that looks now finds no version
        for slot in slots:
            source = state[slot.name]
            self._view(slot).copy_(source.detach().reshape(slot.shape))
        header[:] = _HEADER.pack(_MAGIC, version)
        return SharedHandle(self.node_id, os.getpid(), self.fd, self.size, version, slots)

    def _layout(self, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> tuple[TensorSlot, ...]:
        slots, offset = [], _ALIGN
        for name, t in state.items():
            dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
            nbytes = t.numel() * dt.itemsize
            slots.append(TensorSlot(name, str(dt).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        if offset != self.size:  # the first write, or another set of tensors: size the file again
            if self._map is not None:
                self._map.close()
            os.ftruncate(self.fd, offset)
            self._map = mmap.mmap(self.fd, offset)
            self.size = offset
        self._slots = tuple(slots)
        return self._slots

    def _view(self, slot: TensorSlot) -> torch.Tensor:
        dtype = getattr(torch, slot.dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
        return flat.view(dtype).view(slot.shape)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self.fd)


class NotOnThisNode(RuntimeError):
    """A handle from another node's learner: its memory cannot be mapped here."""


class StaleHandle(RuntimeError):
    """The buffer no longer holds the handle's version (the learner wrote another one, or died)."""


_maps: dict[tuple[int, int], mmap.mmap] = {}  # (pid, fd) -> this process's read-only mapping


def read_shared(handle: SharedHandle, node_id: str) -> dict[str, torch.Tensor]:
    """The handle's tensors as read-only views of the mapping (copy them into your own weights).
    Raises NotOnThisNode or StaleHandle."""
    import warnings

    if handle.node_id != node_id:
        raise NotOnThisNode(f"weights of version {handle.version} are on node {handle.node_id}, this is {node_id}")
    key = (handle.pid, handle.fd)
    mapped = _maps.get(key)
    if mapped is None or len(mapped) != handle.size:
        try:
            with open(f"/proc/{handle.pid}/fd/{handle.fd}", "rb") as f:
                mapped = mmap.mmap(f.fileno(), handle.size, prot=mmap.PROT_READ)
        except OSError as err:
            raise StaleHandle(f"weights of version {handle.version}: the learner's buffer is gone ({err})") from err
        _maps[key] = mapped
    magic, version = _HEADER.unpack_from(mapped, 0)
    if magic != _MAGIC or version != handle.version:
        raise StaleHandle(f"the learner's buffer holds version {version}, not {handle.version}")
    out = {}
    with warnings.catch_warnings():  # torch warns that a read-only mapping is not writable: nothing writes it
        warnings.simplefilter("ignore", UserWarning)
        for slot in handle.slots:
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
            out[slot.name] = flat.view(getattr(torch, slot.dtype)).view(slot.shape)
    return out
