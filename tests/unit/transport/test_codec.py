import pytest
import torch

from keel.trajectory import Trajectories
from keel.transport.codec import (
    DecodeError,
    tensor_from_proto,
    tensor_to_proto,
    trajectories_from_proto,
    trajectories_to_proto,
)
from keel.transport.pb import tensor_pb2


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.uint8]
)
def test_tensor_round_trip(dtype):
    t = (torch.arange(12).reshape(3, 4) % 3).to(dtype)
    back = tensor_from_proto(tensor_to_proto(t), "x")
    assert back.dtype == dtype and torch.equal(back, t)


def test_bad_tensors_name_the_field():
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=bytes(20))
    with pytest.raises(DecodeError, match=r"w: 20 bytes for shape \[2, 3\] of torch.float32 \(expected 24\)"):
        tensor_from_proto(msg, "w")
    with pytest.raises(DecodeError, match="w: unknown or unspecified dtype 0"):
        tensor_from_proto(tensor_pb2.Tensor(shape=[1], data=bytes(4)), "w")


def _traj():
    return Trajectories(
        rollout_id="r1",
        weight_version=3,
        prompt_ids=["a", "b"],
        sample_index=[0, 0],
        prompt_tokens=torch.tensor([[0, 5], [6, 7]]),
        prompt_mask=torch.tensor([[False, True], [True, True]]),
        response_tokens=torch.tensor([[8, 9, 0], [10, 0, 0]]),
        response_mask=torch.tensor([[True, True, False], [True, False, False]]),
        behaviour_logprobs=torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]]),
        prompts=["", ""],
        responses=["x", "y"],
    )


def test_trajectories_round_trip():
    t = _traj()
    back = trajectories_from_proto(trajectories_to_proto(t, "w0"))
    for name in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "behaviour_logprobs"):
        assert torch.equal(getattr(back, name), getattr(t, name)), name
    assert (back.rollout_id, back.weight_version, back.prompt_ids, back.responses) == ("r1", 3, ["a", "b"], ["x", "y"])


def test_trajectories_that_disagree_are_refused_with_the_field():
    msg = trajectories_to_proto(_traj())
    msg.behaviour_logprobs.CopyFrom(tensor_to_proto(torch.zeros(2, 4)))
    with pytest.raises(DecodeError, match=r"behaviour_logprobs: shape \(2, 4\), expected \(2, 3\)"):
        trajectories_from_proto(msg)
    msg = trajectories_to_proto(_traj())
    msg.response_mask.CopyFrom(tensor_to_proto(torch.ones(2, 3)))
    with pytest.raises(DecodeError, match="response_mask: dtype torch.float32, expected torch.bool"):
        trajectories_from_proto(msg)
    msg = trajectories_to_proto(_traj())
    del msg.prompt_ids[1]
    with pytest.raises(DecodeError, match="prompt_ids: 1 entries for 2 samples"):
        trajectories_from_proto(msg)
