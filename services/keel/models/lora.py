"""LoRA adapters on the wire and merged: what the learner sends a rollout worker in a weight sync,
and how the weights that serve are made from it.

An adapter payload holds, for every adapted Linear layer M (its HF name, e.g.
model.layers.0.self_attn.q_proj, whose base weight W0 = M.weight is (out, in)):

    M.lora_A.weight   (r, in)    in the learner's dtype (model.dtype)
    M.lora_B.weight   (out, r)
    lora_scaling      ()         float32, alpha / r (one for every layer)

and nothing else. The rollout worker keeps W0 as loaded and serves W = W0 + scaling * B @ A
computed by `merge_delta`, the arithmetic of PEFT's own merge, so the rollout's weights are bit for
bit those of the learner's merged model (`merged_state`, what `checkpoints/final/merged` holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
SCALING = "lora_scaling"

WeightSpecs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def matches(module: str, targets: Iterable[str]) -> bool:
    """Whether a module name is targeted, by PEFT's rule for a list: the whole name, or its suffix after a dot."""
    return any(module == t or module.endswith("." + t) for t in targets)


def adapted_layers(base_specs: WeightSpecs, targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """HF module name -> (out, in) of every layer an adapter goes on: a 2-D `<module>.weight` of the base
    checkpoint whose module matches `targets` (keel.models.loading.apply_lora adapts Linear layers only)."""
    targets = list(targets)
    layers = {}
    for name, (shape, _) in base_specs.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and matches(module, targets):
            layers[module] = (int(shape[0]), int(shape[1]))
    return layers


def adapter_specs(layers: Mapping[str, tuple[int, int]], rank: int, dtype: torch.dtype) -> dict:
    """Name -> (shape, dtype) of every tensor an adapter payload for `layers` must hold, and nothing else."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {SCALING: ((), torch.float32)}
    for module, (out_features, in_features) in layers.items():
        specs[module + LORA_A] = ((rank, in_features), dtype)
        specs[module + LORA_B] = ((out_features, rank), dtype)
    return specs


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """HF module name -> the PEFT LoRA layer wrapping it."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def adapter_state(peft_model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter payload of a PeftModel (see the module docstring), A and B in `dtype` (model.dtype:
    DeepSpeed keeps every parameter in it): detached views of the live parameters when they are in it
    already, to be copied by whoever sends them."""
    state: dict[str, torch.Tensor] = {}
    scales = set()
    for module, layer in lora_layers(peft_model).items():
        [adapter] = layer.active_adapters
        state[module + LORA_A] = layer.lora_A[adapter].weight.detach().to(dtype)
        state[module + LORA_B] = layer.lora_B[adapter].weight.detach().to(dtype)
        scales.add(layer.scaling[adapter])
    if len(scales) != 1:
        raise ValueError(f"expected one LoRA scaling for every layer, got {sorted(scales)}")
    state[SCALING] = torch.tensor(scales.pop(), dtype=torch.float32)
    return state


def merge_delta(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W0 + scaling * B @ A: (out, in) from W0 (out, in), A (r, in), B (out, r), in W0's dtype.

    PEFT's arithmetic (lora.Linear.get_delta_weight, then merge's in-place add): the product in the
    adapters' dtype (in float32 on CPU for 16-bit adapters, then cast back) times the scaling, added to
    W0 in the wider of the two dtypes and stored in W0's.
    """
    half = w0.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
    delta = ((b.float() @ a.float()) * scaling).to(b.dtype) if half else (b @ a) * scaling
    return (w0 + delta).to(w0.dtype)


def merged_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The merged model's whole state under HF names, on CPU: every adapted weight W0 + scaling * B @ A
    (`merge_delta`), everything else as it is. The PeftModel itself is not changed."""
    layers = lora_layers(peft_model)
    state = {}
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor.detach().cpu()
    for module, layer in layers.items():
        [adapter] = layer.active_adapters
        w0 = layer.get_base_layer().weight.detach().cpu()
        a, b = layer.lora_A[adapter].weight.detach().cpu(), layer.lora_B[adapter].weight.detach().cpu()
        state[module + ".weight"] = merge_delta(w0, a, b, layer.scaling[adapter])
    return state


def save_adapter_and_merged(peft_model: nn.Module, out: str | Path, tokenizer) -> Path:
    """The adapter at `out` (adapter_config.json + adapter_model.safetensors, for
    PeftModel.from_pretrained(base, out)) and the merged model in HF format, with the tokenizer, at
    `out`/merged (for AutoModelForCausalLM.from_pretrained). Returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    merged = out / "merged"
    peft_model.get_base_model().save_pretrained(merged, state_dict=merged_state(peft_model), safe_serialization=True)
    tokenizer.save_pretrained(merged)
    return out
