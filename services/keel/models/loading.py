"""Loading HF checkpoints, the critic's value head, and the one forward pass every role shares.

The rollout's HF backend, the reference and the learner all compute log-probs of response
tokens with `response_logits`; keeping that in one function is what makes the learner's
recomputed old log-probs agree with the sampler's.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from keel.algo.logprobs import gather_logprobs
from keel.trajectory import position_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)


def apply_lora(model: nn.Module, cfg) -> nn.Module:
    """`model` wrapped in PEFT LoRA adapters as `cfg` (keel.config.LoraConfig) says; returns the PeftModel.

    Only the adapters require grad. lora_B starts at zero, so the wrapped model computes exactly what
    `model` did, and with its adapter off (`with peft_model.disable_adapter():`) it stays the base
    model. Every adapted layer must be an nn.Linear without fan-in/fan-out transposition: a rollout
    worker merges W = W0 + scale * B @ A into exactly such weights (keel.models.lora).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if getattr(model, "is_gradient_checkpointing", False):
        # reentrant checkpointing backpropagates only into blocks whose input requires grad, and the
        # frozen embeddings' output does not: the adapters would get no gradient
        model.enable_input_require_grads()
    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    peft_model = get_peft_model(model, peft_cfg)
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and (not isinstance(module, LoraLinear) or module.fan_in_fan_out):
            raise ValueError(
                f"model.lora.target_modules: {name} ({type(module.get_base_layer()).__name__}) is not a Linear "
                "layer; LoRA here adapts nn.Linear layers only"
            )
    return peft_model


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters of a model (as metrics: params/trainable, params/total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params/trainable": float(trainable), "params/total": float(sum(p.numel() for p in model.parameters()))}


def checkpoint_tensors(path: str, names: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors `names` of the HF safetensors checkpoint at `path` (every *.safetensors file in it),
    floating ones cast to `dtype` as from_pretrained casts them. Raises KeyError naming a missing one."""
    from pathlib import Path

    from safetensors import safe_open

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in names & set(f.keys()):
                t = f.get_tensor(name)
                out[name] = t.to(dtype) if t.is_floating_point() else t
    missing = sorted(names - set(out))
    if missing:
        raise KeyError(f"{path}: no tensor {missing[0]!r} in its *.safetensors files ({len(missing)} missing)")
    return out


def compute_precision(precision: str, device: torch.device):
    """The context a forward pass runs in: bfloat16 autocast for precision `mixed` (the weights stay
    in their own dtype; backward runs outside it), nothing for `full`."""
    if precision == "mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def response_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, precision: str = "full"
) -> torch.Tensor:
    """Logits that predicted each response token; (B, P + R) in, (B, R, V) out.

    Position ids count only real tokens, so left padding does not shift rotary positions
    (vLLM runs the unpadded sequence). Logit t - 1 predicts token t, hence the shift by one.
    """
    with compute_precision(precision, input_ids.device):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits[:, prompt_len - 1 : -1]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn every dropout off, in train mode too: nn.Dropout modules get p = 0, and attention
    modules that read a dropout rate in forward (HF's `attention_dropout`) get 0. Returns `model`."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name in list(vars(config)):
            if "dropout" in name and isinstance(getattr(config, name), float):
                setattr(config, name, 0.0)
    return model


@torch.no_grad()
def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    micro_batch_size: int = 8,
    precision: str = "full",
) -> torch.Tensor:
    """log pi(a_t) of each response token under `model` at the sampling temperature; (B, R) float32."""
    model_device = next(model.parameters()).device
    chunks = []
    for start in range(0, input_ids.shape[0], micro_batch_size):
        ids = input_ids[start : start + micro_batch_size].to(model_device)
        mask = attention_mask[start : start + micro_batch_size].to(model_device)
        logits = response_logits(model, ids, mask, prompt_len, precision)
        chunks.append(gather_logprobs(logits, ids[:, prompt_len:], temperature).float().cpu())
    return torch.cat(chunks)


class ValueModel(nn.Module):
    """A causal LM's backbone with a scalar value head: V(s_t) for every position.

    The head is initialised to zero so the first values are 0 and the first advantages equal
    the (whitened) returns instead of noise.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32") -> ValueModel:
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, dtype=DTYPES[dtype])
        model = cls(backbone, backbone.config.hidden_size)
        return model.to(DTYPES[dtype])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """(B, P + R) in, (B, R) values of the states before each response token."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        ).last_hidden_state
        values = self.value_head(hidden).squeeze(-1)
        return values[:, prompt_len - 1 : -1].float()
