"""benchmarks/roofline.py's analytic FLOPs against torch's FlopCounterMode on a real HF Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import roofline  # noqa: E402

DIMS = {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 256, "vocab": 300}


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=DIMS["vocab"],
        hidden_size=DIMS["hidden_size"],
        intermediate_size=DIMS["intermediate_size"],
        num_hidden_layers=DIMS["num_layers"],
        num_attention_heads=DIMS["num_heads"],
        num_key_value_heads=DIMS["num_kv_heads"],
        head_dim=64,
        tie_word_embeddings=False,
        # eager: its q k^T and p v are bmm's that FlopCounterMode counts (CPU sdpa is not counted)
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_flops_match_flop_counter(model):
    batch, seq = 3, 24
    ids = torch.randint(0, DIMS["vocab"], (batch, seq))
    measured = counted(lambda: model(input_ids=ids))
    # eager attention computes all seq^2 scores, masked or not
    assert roofline.forward_flops(DIMS, batch, seq, causal=False) == pytest.approx(measured, rel=0.05)
    causal = roofline.forward_flops(DIMS, batch, seq)
    assert causal < measured  # the causal count leaves the masked half out


def test_generation_flops_match_flop_counter(model):
    batch, prompt_len, new_tokens = 2, 10, 6
    ids = torch.randint(4, DIMS["vocab"], (batch, prompt_len))
    measured = counted(
        lambda: model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )
    )
    gen = roofline.generation_flops(DIMS, batch, prompt_len, new_tokens)
    assert gen["prefill"] + gen["decode"] == pytest.approx(measured, rel=0.05)


def test_step_flops_phases():
    workload = roofline.Workload(prompts_per_step=2, samples_per_prompt=2, new_tokens=8)
    flops = roofline.step_flops(DIMS, workload, prompt_len=6)
    forward = roofline.forward_flops(DIMS, 4, 14)
    assert flops["reference"] == flops["old_logprobs"] == forward
    assert flops["policy"] == 3 * forward
    assert flops["total"] == pytest.approx(flops["generation"] + 5 * forward)
