"""LoRA on the tiny Llama: adapters only train, the adapter off is the base model, the wire payload
matches its specs, and the merge is PEFT's own, bit for bit."""

from __future__ import annotations

import pytest
import torch

from keel.config import LoraConfig
from keel.models.loading import apply_lora, checkpoint_tensors, load_causal_lm, parameter_counts
from keel.models.lora import (
    LORA_A,
    LORA_B,
    SCALING,
    adapted_layers,
    adapter_specs,
    adapter_state,
    merge_delta,
    merged_state,
    save_adapter_and_merged,
)

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _trained(model_dir, dtype="float32", seed=0, **lora):
    """A LoRA-wrapped tiny model whose lora_B are random (as after training)."""
    peft = apply_lora(load_causal_lm(str(model_dir), dtype), LoraConfig(rank=4, alpha=8, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return peft


def test_only_adapters_train_and_start_as_the_base_model(tiny_model_dir):
    base = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        want = base(IDS).logits
    total = sum(p.numel() for p in base.parameters())
    peft = apply_lora(base, LoraConfig(rank=4, alpha=8))
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    counts = parameter_counts(peft)
    # 2 layers x 4 projections x (A: 4 x 128, B: 128 x 4)
    assert counts == {"params/trainable": 2 * 4 * 2 * 4 * 128, "params/total": total + 2 * 4 * 2 * 4 * 128}
    with torch.no_grad():
        assert torch.equal(peft(IDS).logits, want)  # lora_B = 0: exactly the base model


def test_adapter_off_is_the_base_model_after_training(tiny_model_dir):
    with torch.no_grad():
        want = load_causal_lm(str(tiny_model_dir))(IDS).logits
    peft = _trained(tiny_model_dir)
    with torch.no_grad():
        assert not torch.equal(peft(IDS).logits, want)
        with peft.disable_adapter():
            assert torch.equal(peft(IDS).logits, want)


def test_payload_matches_the_specs_a_worker_derives_from_the_checkpoint(tiny_model_dir):
    from keel.rollout.vllm_backend import _checkpoint_specs

    peft = _trained(tiny_model_dir, target_modules=["q_proj", "v_proj", "down_proj"])
    state = adapter_state(peft, torch.float32)
    layers = adapted_layers(_checkpoint_specs(str(tiny_model_dir)), ["q_proj", "v_proj", "down_proj"])
    assert len(layers) == 6 and layers["model.layers.1.mlp.down_proj"] == (128, 256)
    specs = adapter_specs(layers, 4, torch.float32)
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == specs
    assert float(state[SCALING]) == 2.0
    assert state["model.layers.0.self_attn.q_proj" + LORA_A].shape == (4, 128)
    assert state["model.layers.0.self_attn.q_proj" + LORA_B].shape == (128, 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_is_peft_merge_bit_for_bit(tiny_model_dir, dtype):
    peft = _trained(tiny_model_dir, dtype)
    ours = merged_state(peft)
    state = adapter_state(peft, torch.float32)  # PEFT keeps a bfloat16 model's adapters in float32
    base = checkpoint_tensors(str(tiny_model_dir), set(ours), getattr(torch, dtype))
    module = "model.layers.1.self_attn.o_proj"
    w = merge_delta(base[module + ".weight"], state[module + LORA_A], state[module + LORA_B], float(state[SCALING]))
    peft_merged = peft.merge_and_unload().state_dict()
    assert set(ours) == set(peft_merged)
    assert all(torch.equal(ours[k], peft_merged[k]) for k in ours)
    assert torch.equal(w, peft_merged[module + ".weight"]) and w.dtype == getattr(torch, dtype)


def test_saved_adapter_and_merged_model_give_the_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from keel.models.loading import load_tokenizer

    peft = _trained(tiny_model_dir)
    with torch.no_grad():
        want = peft(IDS).logits
    out = save_adapter_and_merged(peft, tmp_path / "final", load_tokenizer(str(tiny_model_dir)))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "merged" / "config.json").exists() and (out / "merged" / "tokenizer.json").exists()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    with torch.no_grad():
        assert torch.equal(adapter(IDS).logits, want)
        torch.testing.assert_close(merged(IDS).logits, want, atol=1e-5, rtol=0)  # merged vs unmerged arithmetic
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in merged_state(peft).items())


def test_only_linear_layers_are_adapted(tiny_model_dir):
    with pytest.raises(ValueError, match=r"target_modules: model.embed_tokens \(Embedding\) is not a Linear"):
        apply_lora(load_causal_lm(str(tiny_model_dir)), LoraConfig(target_modules=["embed_tokens"]))
