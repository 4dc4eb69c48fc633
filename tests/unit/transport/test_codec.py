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
    scalar = t[1, 1]  # 0-d: a LoRA sync's scaling
    back = tensor_from_proto(tensor_to_proto(scalar), "x")
    assert back.shape == () and back.dtype == dtype and torch.equal(back, scalar)


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


def _broken(how: str):
    msg = trajectories_to_proto(_traj())
    if how == "empty":
        for name in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "behaviour_logprobs"):
            t = getattr(msg, name)
            t.shape[0] = 0
            t.data = b""
        del msg.prompt_ids[:], msg.sample_index[:], msg.response_texts[:]
    elif how == "past_vocab":
        msg.response_tokens.CopyFrom(tensor_to_proto(torch.tensor([[8, 9, 0], [10, 64, 0]], dtype=torch.int32)))
    elif how == "negative":
        msg.prompt_tokens.CopyFrom(tensor_to_proto(torch.tensor([[0, 5], [-1, 7]], dtype=torch.int32)))
    elif how in ("nan", "inf"):
        lp = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]])
        lp[1, 1] = float(how)
        msg.behaviour_logprobs.CopyFrom(tensor_to_proto(lp))
    elif how == "bool":
        data = bytearray(msg.response_mask.data)
        data[4] = 2  # element [1, 1]
        msg.response_mask.data = bytes(data)
    return msg


@pytest.mark.parametrize(
    "how, message",
    [
        ("empty", r"response_tokens: empty batch \(0 samples\)"),
        ("past_vocab", r"response_tokens: token id 64 at \[1, 1\] is outside the vocabulary \[0, 64\)"),
        ("negative", r"prompt_tokens: token id -1 at \[1, 0\] is outside the vocabulary"),
        ("nan", r"behaviour_logprobs: nan at \[1, 1\] is not finite"),
        ("inf", r"behaviour_logprobs: inf at \[1, 1\] is not finite"),
        ("bool", r"response_mask: byte 2 at element 4 is not a bool \(0 or 1\)"),
    ],
)
def test_hostile_trajectories_are_refused_naming_the_field(how, message):
    vocab = {"vocab_size": 64} if how == "past_vocab" else {}  # the other checks need no vocabulary
    with pytest.raises(DecodeError, match=message):
        trajectories_from_proto(_broken(how), **vocab)


def test_token_ids_just_inside_the_vocabulary_decode():
    back = trajectories_from_proto(trajectories_to_proto(_traj()), vocab_size=11)  # the largest id is 10
    assert back.response_tokens.max().item() == 10
    with pytest.raises(DecodeError, match="token id 10"):
        trajectories_from_proto(trajectories_to_proto(_traj()), vocab_size=10)
