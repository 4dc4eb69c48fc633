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
