"""The rollout side of an adapter-only weight sync (model.lora).

The worker keeps the base weights W0 of the adapted layers as the checkpoint holds them (and those
its backend must reload together with them: vLLM's fused q/k/v and gate/up layers), in the learner's
dtype. Each sync's adapter payload (keel.models.lora) becomes W = W0 + scaling * B @ A for those
layers alone, cast to the rollout's dtype; the backend reloads only them.
"""

from __future__ import annotations

import torch

from keel.config import ModelConfig
from keel.models.lora import LORA_A, LORA_B, SCALING, WeightSpecs, adapted_layers, adapter_specs, merge_delta
from keel.rollout.base import Generator


class AdapterMerger:
    def __init__(self, model: ModelConfig, base_specs: WeightSpecs, generator: Generator, serving: torch.dtype):
        from keel.models.loading import DTYPES, checkpoint_tensors

        lora = model.lora
        self.layers = adapted_layers(base_specs, lora.target_modules)  # HF module name -> (out, in)
        if not self.layers:
            raise ValueError(f"model.lora.target_modules {lora.target_modules}: no layer of {model.policy} matches")
        learner_dtype = DTYPES[model.dtype]
        # what a payload must hold: A (r, in) and B (out, r) of every adapted layer, and the scaling
        self.specs = adapter_specs(self.layers, lora.rank, learner_dtype)
        names = generator.load_group({module + ".weight" for module in self.layers})
        # W0 in the learner's dtype, so the merge is the learner's merged model's, bit for bit
        self.base = checkpoint_tensors(model.policy, names, learner_dtype)
        self.serving = serving  # the rollout's weight dtype (keel.config.rollout_dtype)

    @property
    def base_bytes(self) -> int:
        """Memory the kept base weights take."""
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def merge(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF name -> the weight to load, for every layer of the load group: merged where adapted, W0
        elsewhere. `state` is a payload already checked against `specs`."""
        scaling = float(state[SCALING])
        out = {}
        for name, w0 in self.base.items():
            module = name.removesuffix(".weight")
            if module in self.layers:
                w0 = merge_delta(w0, state[module + LORA_A], state[module + LORA_B], scaling)
            out[name] = w0.to(self.serving)
        return out
