"""RolloutWorker with both backends, without Ray: shapes, masks, log-probs, weight updates."""

from __future__ import annotations

import pytest
import torch

from keel.config import ModelConfig, RolloutConfig, SamplingConfig
from keel.data.prompts import Prompt
from keel.models.loading import load_causal_lm, response_logprobs
from keel.rollout.worker import RolloutWorker, WeightUpdateError

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8, n=1)


def _prompts(tok, texts):
    return [Prompt(str(i), t, tuple(tok(t).input_ids), {"answer": "0"}) for i, t in enumerate(texts)]


def _scaled_state(model_dir, factor):
    model = load_causal_lm(str(model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return {k: v.clone() for k, v in model.state_dict().items()}, model


@pytest.fixture(scope="module")
def hf_worker(tiny_model_dir):
    return RolloutWorker(ModelConfig(policy=str(tiny_model_dir)), RolloutConfig(backend="hf"), 64, seed=0)


@pytest.fixture(scope="module")
def vllm_worker(tiny_model_dir):
    worker = RolloutWorker(ModelConfig(policy=str(tiny_model_dir)), RolloutConfig(backend="vllm"), 64, seed=0)
    yield worker
    worker.generator.close()  # frees its memory for the next module's engine


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_batch_shapes_masks_and_logprobs(backend, request, tiny_model_dir):
    worker = request.getfixturevalue(f"{backend}_worker")
    tok = worker.tokenizer
    prompts = _prompts(tok, ["3+4=", "the cat sat on"])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6, n=3)
    traj = worker.generate(prompts, seed=1, sampling=sampling)
    assert len(traj) == 6 and traj.prompt_ids == ["0", "0", "0", "1", "1", "1"]
    assert traj.sample_index == [0, 1, 2, 0, 1, 2]
    assert traj.weight_version == worker.weight_version
    assert traj.response_tokens.shape[1] <= 6
    # left-padded prompts: the shorter prompt's padding sits on the left
    assert traj.prompt_mask[:, -1].all()
    lengths = traj.response_mask.sum(-1)
    assert (lengths >= 1).all()
    # behaviour log-probs are real log-probs on generated tokens and 0 on padding
    assert (traj.behaviour_logprobs[traj.response_mask] <= 0).all()
    assert (traj.behaviour_logprobs[~traj.response_mask] == 0).all()
    # and they agree with an HF forward pass at the same temperature
    model = load_causal_lm(str(tiny_model_dir)) if worker.weight_version == 0 else None
    if model is not None:
        lp = response_logprobs(model, traj.input_ids, traj.attention_mask, traj.prompt_tokens.shape[1], 1.0)
        torch.testing.assert_close(
            lp[traj.response_mask], traj.behaviour_logprobs[traj.response_mask], atol=2e-4, rtol=0
        )


def test_vllm_and_hf_agree_after_weight_update(hf_worker, vllm_worker, tiny_model_dir):
    state, updated = _scaled_state(tiny_model_dir, 2.0)
    before = vllm_worker.generate(_prompts(vllm_worker.tokenizer, ["1+2="]), seed=0, sampling=GREEDY)
    for worker in (hf_worker, vllm_worker):
        worker.update_weights({k: v.clone() for k, v in state.items()}, version=worker.weight_version + 1)
    prompts = _prompts(hf_worker.tokenizer, ["1+2=", "the cat", "5 6 7"])
    a = hf_worker.generate(prompts, seed=0, sampling=GREEDY)
    b = vllm_worker.generate(prompts, seed=0, sampling=GREEDY)
    assert a.response_tokens.tolist() == b.response_tokens.tolist()
    torch.testing.assert_close(a.behaviour_logprobs, b.behaviour_logprobs, atol=1e-4, rtol=0)
    assert b.weight_version == vllm_worker.weight_version
    # the update really changed what vLLM serves, and HF generate agrees with the updated model
    assert before.response_tokens[0].tolist() != b.response_tokens[0].tolist()
    ids = torch.tensor([prompts[0].token_ids])
    want = updated.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=hf_worker.tokenizer.pad_token_id)
    n = int(b.response_mask[0].sum())
    assert want[0, ids.shape[1] : ids.shape[1] + n].tolist() == b.response_tokens[0, :n].tolist()


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_bad_weight_update_keeps_old_weights(backend, request, tiny_model_dir):
    worker = request.getfixturevalue(f"{backend}_worker")
    prompts = _prompts(worker.tokenizer, ["2+2="])
    before = worker.generate(prompts, seed=0, sampling=GREEDY)
    version = worker.weight_version
    state, _ = _scaled_state(tiny_model_dir, 0.5)
    name = next(iter(state))
    bad_cases = {
        "lacks 1 tensors": {k: v for k, v in state.items() if k != name},
        "unknown tensor 'extra.weight'": {**state, "extra.weight": torch.zeros(2)},
        "has shape": {**state, name: state[name][:1]},
        "non-finite": {**state, name: state[name] * float("nan")},
    }
    for message, bad in bad_cases.items():
        with pytest.raises(WeightUpdateError, match=message):
            worker.update_weights(bad, version=version + 1)
    with pytest.raises(WeightUpdateError, match="not newer"):
        worker.update_weights(state, version=version)
    after = worker.generate(prompts, seed=0, sampling=GREEDY)
    assert worker.weight_version == version
    assert after.response_tokens.tolist() == before.response_tokens.tolist()
    torch.testing.assert_close(after.behaviour_logprobs, before.behaviour_logprobs)
