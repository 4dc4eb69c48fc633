"""Adapter-only weight sync into a rollout worker (model.lora), both backends, without Ray: the
worker merges W0 + scaling * B @ A into the adapted layers alone and then serves exactly the
learner's merged model; a bad payload leaves the old weights serving."""

from __future__ import annotations

import pytest
import torch

from keel.config import LoraConfig, ModelConfig, RolloutConfig, SamplingConfig
from keel.data.prompts import Prompt
from keel.models.loading import apply_lora, load_causal_lm
from keel.models.lora import LORA_A, LORA_B, SCALING, adapter_state, merged_state
from keel.rollout.worker import RolloutWorker, WeightUpdateError

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8, n=1)
TEXTS = ["1+2=", "the cat", "5 6 7", "hello world"]


def _learner_side(model_dir, lora: LoraConfig, seed: int):
    """What a learner would hold after training: (the adapter payload it sends, its merged model)."""
    peft = apply_lora(load_causal_lm(str(model_dir)), lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    merged = load_causal_lm(str(model_dir))
    merged.load_state_dict(merged_state(peft))
    return {k: v.clone() for k, v in adapter_state(peft, torch.float32).items()}, merged.eval()


def _prompts(tok, texts):
    return [Prompt(str(i), t, tuple(tok(t).input_ids), {}) for i, t in enumerate(texts)]


def _greedy_of(model, tok, prompt: Prompt, n: int) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] : ids.shape[1] + n].tolist()


@pytest.fixture(scope="module")
def hf_lora_worker(tiny_model_dir):
    model = ModelConfig(policy=str(tiny_model_dir), lora=LoraConfig(rank=4, alpha=8))
    return RolloutWorker(model, RolloutConfig(backend="hf"), 64, seed=0)


@pytest.fixture(scope="module")
def vllm_lora_worker(tiny_model_dir):
    # q and v without k: vLLM fuses q/k/v into one layer, so the worker reloads k (its base) with them
    model = ModelConfig(
        policy=str(tiny_model_dir), lora=LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    worker = RolloutWorker(model, RolloutConfig(backend="vllm"), 64, seed=0)
    yield worker
    worker.generator.close()


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_rollout_serves_the_learners_merged_model_after_an_adapter_sync(backend, request, tiny_model_dir):
    worker = request.getfixturevalue(f"{backend}_lora_worker")
    lora = LoraConfig(rank=4, alpha=8)
    if backend == "vllm":
        lora = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
        kept = set(worker.adapter.base)
        assert {n.rsplit(".", 2)[-2] for n in kept} == {"q_proj", "k_proj", "v_proj"}  # the fused layer, whole
    tok = worker.tokenizer
    prompts = _prompts(tok, TEXTS)
    for step, seed in enumerate((1, 2), start=1):  # two syncs: each merges into the base, not the last merge
        payload, merged = _learner_side(tiny_model_dir, lora, seed)
        assert {k: (tuple(v.shape), v.dtype) for k, v in payload.items()} == worker._wire_specs
        worker.update_weights(payload, version=worker.weight_version + 1)
        traj = worker.generate(prompts, seed=0, sampling=GREEDY)
        for i, prompt in enumerate(prompts):
            n = int(traj.response_mask[i].sum())
            assert traj.response_tokens[i, :n].tolist() == _greedy_of(merged, tok, prompt, n), (step, prompt.text)
    assert worker.weight_version == 2


def test_hf_worker_reloads_only_the_adapted_layers(hf_lora_worker, tiny_model_dir):
    model = hf_lora_worker.generator.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    payload, merged = _learner_side(tiny_model_dir, LoraConfig(rank=4, alpha=8), seed=3)
    hf_lora_worker.update_weights(payload, version=hf_lora_worker.weight_version + 1)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qkvo"}
    assert all(torch.equal(after[k], v) for k, v in merged.state_dict().items())


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_bad_adapter_keeps_the_old_weights(backend, request, tiny_model_dir):
    worker = request.getfixturevalue(f"{backend}_lora_worker")
    specs = worker.adapter.specs
    prompts = _prompts(worker.tokenizer, TEXTS[:2])
    before = worker.generate(prompts, seed=0, sampling=GREEDY)
    version = worker.weight_version
    targets = ["q_proj", "v_proj"] if backend == "vllm" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    good, _ = _learner_side(tiny_model_dir, LoraConfig(rank=4, alpha=8, target_modules=targets), seed=4)
    a = next(k for k in specs if k.endswith(LORA_A))
    b = a.replace(LORA_A, LORA_B)
    bad_cases = {
        "lacks 1 tensors": {k: v for k, v in good.items() if k != a},
        "unknown tensor 'model.norm.lora_A.weight'": {**good, "model.norm.lora_A.weight": torch.zeros(4, 128)},
        "has shape": {**good, a: good[a][:2]},  # another rank
        "non-finite": {**good, b: good[b] * float("nan")},
        f"tensor '{SCALING}' has non-finite": {**good, SCALING: torch.tensor(float("inf"))},
        "merged tensor .* has non-finite": {**good, b: good[b] * 1e3, SCALING: torch.tensor(3e38)},
        # full weights sent to a worker that takes adapters
        f"lacks {len(specs)} tensors": {"model.layers.0.self_attn.q_proj.weight": torch.zeros(128, 128)},
    }
    for message, bad in bad_cases.items():
        with pytest.raises(WeightUpdateError, match=message):
            worker.update_weights(bad, version=version + 1)
    after = worker.generate(prompts, seed=0, sampling=GREEDY)
    assert worker.weight_version == version
    assert after.response_tokens.tolist() == before.response_tokens.tolist()
    torch.testing.assert_close(after.behaviour_logprobs, before.behaviour_logprobs)


# --------------------------------------------------------------------------- over the wire


@pytest.mark.parametrize("how", ["flip", "checksum", "truncate"])
def test_adapter_over_grpc_is_checksummed_and_all_or_nothing(how, hf_lora_worker, tiny_model_dir, weight_address):
    """The adapter crosses the WeightService in checksummed chunks, against the worker's adapter specs;
    a damaged fetch leaves the old weights serving, and an intact one serves the merged model."""
    from keel.config import GrpcConfig
    from keel.transport.weights import WeightFetchError, WeightServicer, WeightStore
    from unit.transport.test_weights import Tampering

    worker = hf_lora_worker
    prompts = _prompts(worker.tokenizer, TEXTS)
    payload, merged = _learner_side(tiny_model_dir, LoraConfig(rank=4, alpha=8), seed=5)
    version = worker.weight_version + 1
    store = WeightStore(chunk_bytes=1024)  # 2 KiB per A or B: several chunks each
    manifest = store.publish(version, payload)
    assert manifest.total_bytes == sum(t.numel() * 4 for t in payload.values()) and manifest.num_chunks > 17
    before = worker.generate(prompts, seed=0, sampling=GREEDY)
    worker.connect(GrpcConfig(auth=False, retries=0), weights=weight_address(Tampering(store, how)))
    with pytest.raises(WeightFetchError):
        worker.pull_weights(version)
    assert worker.weight_version == version - 1
    assert worker.generate(prompts, seed=0, sampling=GREEDY).response_tokens.tolist() == before.response_tokens.tolist()

    worker.connect(GrpcConfig(auth=False), weights=weight_address(WeightServicer(store)))
    assert worker.pull_weights(version) == version
    traj = worker.generate(prompts, seed=0, sampling=GREEDY)
    for i, prompt in enumerate(prompts):
        n = int(traj.response_mask[i].sum())
        assert traj.response_tokens[i, :n].tolist() == _greedy_of(merged, worker.tokenizer, prompt, n)


def test_adapter_through_shared_memory_and_the_object_store(hf_lora_worker, tiny_model_dir, ray_session):
    """The learner's shared-memory buffer keeps each tensor's dtype (the float32 scaling beside the
    adapters), and the object store's packed form unpacks to the same payload."""
    import ray

    from keel.transport.objectstore import pack
    from keel.transport.shm import SharedWeights

    worker = hf_lora_worker
    payload, merged = _learner_side(tiny_model_dir, LoraConfig(rank=4, alpha=8), seed=6)
    shared = SharedWeights(ray.get_runtime_context().get_node_id())
    try:
        handle = shared.write(worker.weight_version + 1, payload, None)
        assert handle.total_bytes == sum(t.numel() * t.element_size() for t in payload.values())
        assert worker.update_weights_shared(handle, handle.version) == handle.version
    finally:
        shared.close()
    want = merged.state_dict()
    served = worker.generator.model.state_dict()
    assert all(torch.equal(served[k], want[k]) for k in want)

    payload, merged = _learner_side(tiny_model_dir, LoraConfig(rank=4, alpha=8), seed=7)
    worker.update_weights(pack(payload), worker.weight_version + 1)
    served = worker.generator.model.state_dict()
    assert all(torch.equal(served[k], v) for k, v in merged.state_dict().items())
