"""Conversions between torch tensors / `Trajectories` and the keel.v1 protobuf messages.

This is the one place the wire format meets the in-memory schema. Every decode checks what it
is given and raises `DecodeError` naming the field, so a server can answer INVALID_ARGUMENT
with it.
"""

from __future__ import annotations

import math

import torch

from keel.trajectory import Trajectories
from keel.transport.pb import tensor_pb2, trajectory_pb2

TORCH_TO_PROTO = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
PROTO_TO_TORCH = {v: k for k, v in TORCH_TO_PROTO.items()}


class DecodeError(ValueError):
    """A message that does not describe a valid value; the text names the field."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous CPU copy of `t` (bfloat16 and 0-d tensors included)."""
    t = t.detach().contiguous().cpu().reshape(-1)  # a 0-d tensor cannot be viewed as bytes
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    if t.dtype not in TORCH_TO_PROTO:
        raise ValueError(f"dtype {t.dtype} has no wire representation")
    return tensor_pb2.Tensor(dtype=TORCH_TO_PROTO[t.dtype], shape=list(t.shape), data=tensor_bytes(t))


def tensor_from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: list[int], field: str) -> torch.Tensor:
    """A tensor over `data`: a bytearray is used in place (the tensor shares it), bytes are copied."""
    if any(d < 0 for d in shape):
        raise DecodeError(f"{field}: negative dimension in shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise DecodeError(f"{field}: {len(data)} bytes for shape {shape} of {dtype} (expected {expected})")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    writable = data if isinstance(data, bytearray) else bytearray(data)
    raw = torch.frombuffer(writable, dtype=torch.uint8)
    if dtype == torch.bool and (raw > 1).any():  # torch would read such a byte as a True unequal to True
        i = int((raw > 1).nonzero()[0])
        raise DecodeError(f"{field}: byte {int(raw[i])} at element {i} is not a bool (0 or 1)")
    return raw.view(dtype).reshape(shape)


def tensor_from_proto(msg: tensor_pb2.Tensor, field: str) -> torch.Tensor:
    if msg.dtype not in PROTO_TO_TORCH:
        raise DecodeError(f"{field}: unknown or unspecified dtype {msg.dtype}")
    return tensor_from_bytes(msg.data, PROTO_TO_TORCH[msg.dtype], list(msg.shape), field)


def trajectories_to_proto(
    traj: Trajectories, worker_id: str = "", created_unix_ms: int = 0
) -> trajectory_pb2.TrajectoryBatch:
    return trajectory_pb2.TrajectoryBatch(
        rollout_id=traj.rollout_id,
        weight_version=traj.weight_version,
        worker_id=worker_id,
        prompt_ids=traj.prompt_ids,
        sample_index=traj.sample_index,
        prompt_tokens=tensor_to_proto(traj.prompt_tokens.to(torch.int32)),
        prompt_mask=tensor_to_proto(traj.prompt_mask),
        response_tokens=tensor_to_proto(traj.response_tokens.to(torch.int32)),
        response_mask=tensor_to_proto(traj.response_mask),
        behaviour_logprobs=tensor_to_proto(traj.behaviour_logprobs.float()),
        response_texts=traj.responses,
        created_unix_ms=created_unix_ms,
    )


def trajectories_from_proto(
    msg: trajectory_pb2.TrajectoryBatch, prompts: list[str] | None = None, vocab_size: int | None = None
) -> Trajectories:
    """Decode and check a pushed batch: dtypes, shapes that agree, at least one sample, ids
    present, token ids in [0, vocab_size) (only >= 0 when vocab_size is None), finite log-probs."""
    expect = {
        "prompt_tokens": torch.int32,
        "prompt_mask": torch.bool,
        "response_tokens": torch.int32,
        "response_mask": torch.bool,
        "behaviour_logprobs": torch.float32,
    }
    tensors = {}
    for name, dtype in expect.items():
        if not msg.HasField(name):
            raise DecodeError(f"{name}: missing")
        t = tensor_from_proto(getattr(msg, name), name)
        if t.dtype != dtype:
            raise DecodeError(f"{name}: dtype {t.dtype}, expected {dtype}")
        if t.dim() != 2:
            raise DecodeError(f"{name}: shape {list(t.shape)} is not (B, T)")
        tensors[name] = t
    if not msg.rollout_id:
        raise DecodeError("rollout_id: empty")
    B = tensors["response_tokens"].shape[0]
    if B == 0:
        raise DecodeError("response_tokens: empty batch (0 samples)")
    for name in ("prompt_tokens", "response_tokens"):  # padding included: every position is embedded
        _check_token_ids(tensors[name], name, vocab_size)
    finite = torch.isfinite(tensors["behaviour_logprobs"])
    if not finite.all():
        where = (~finite).nonzero()[0].tolist()
        value = tensors["behaviour_logprobs"][tuple(where)].item()
        raise DecodeError(f"behaviour_logprobs: {value} at {where} is not finite")
    responses = list(msg.response_texts) or [""] * B
    try:
        return Trajectories(
            rollout_id=msg.rollout_id,
            weight_version=msg.weight_version,
            prompt_ids=list(msg.prompt_ids),
            sample_index=list(msg.sample_index),
            prompt_tokens=tensors["prompt_tokens"].long(),
            prompt_mask=tensors["prompt_mask"],
            response_tokens=tensors["response_tokens"].long(),
            response_mask=tensors["response_mask"],
            behaviour_logprobs=tensors["behaviour_logprobs"],
            prompts=prompts if prompts is not None else [""] * B,
            responses=responses,
        )
    except ValueError as err:  # Trajectories.validate names the field that disagrees
        raise DecodeError(str(err).removeprefix("trajectories.")) from None


def _check_token_ids(tokens: torch.Tensor, field: str, vocab_size: int | None) -> None:
    """(B, T) ids: none negative, none at or past vocab_size (an embedding lookup would fail)."""
    if tokens.numel() == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    bad = low if low < 0 else high if vocab_size is not None and high >= vocab_size else None
    if bad is not None:
        where = (tokens == bad).nonzero()[0].tolist()
        vocab = f"[0, {vocab_size})" if vocab_size is not None else "[0, ...)"
        raise DecodeError(f"{field}: token id {bad} at {where} is outside the vocabulary {vocab}")
