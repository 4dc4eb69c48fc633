"""The compute limit of the peer workload (issue 14): FLOPs of one step by phase, this machine's
measured matmul rates, and the floor step time they give.

    .venv/bin/python benchmarks/roofline.py [--size 28m|100m] [--threads 2]

FLOPs count the matmuls of a Llama (SwiGLU MLP, untied lm_head): 2 FLOPs per multiply-add.
Norms, rotary embeddings, activations, softmax and sampling are left out (a few % at these
sizes), so the floor is a lower bound. Per token, with L layers, hidden h, heads nh (nkv of them
for keys and values), head dim d, intermediate I, vocab V:

    linear  = 2 L (h (nh + 2 nkv) d + nh d h + 3 h I)    # q k v o projections, gate up down
    lm_head = 2 h V                                       # per position whose logits are made
    attn(c) = 4 L nh d c                                  # q k^T and p v over c keys

A causal forward over T tokens attends to 1..T keys, so its attention is 2 L nh d T (T + 1)
(the eager `q k^T` of transformers computes all T^2 scores: `causal=False` counts that).

One step of `Workload` (B = batch samples, P = prompt tokens, N = new tokens, T = P + N):

    generation    = B [P linear + lm_head + 2 L nh d P (P + 1)]                     # prefill, last logits
                  + B sum_{c = P+1}^{P+N-1} [linear + lm_head + attn(c)]            # N - 1 decode steps
    reference     = B [T (linear + lm_head) + 2 L nh d T (T + 1)]                    # one forward
    old_logprobs  = reference
    policy        = 3 reference                                                      # forward + backward

The floor divides each phase by this machine's measured matmul rate at the phase's shapes:
decode at M = B rows (memory bound: each step streams every weight), the rest at M = B T rows
(compute bound). Prefill (M = B P) gets the large-M rate too.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from peer_workload import SIZES, VOCAB, Workload, make_model, prompt_rows

PRECISIONS = ("float32", "bfloat16", "mixed")  # mixed: bf16 matmuls (fp32 master weights)


# --------------------------------------------------------------------------- FLOPs


def head_dim(dims: dict) -> int:
    return dims.get("head_dim") or dims["hidden_size"] // dims["num_heads"]


def linear_flops_per_token(dims: dict) -> float:
    """2 x the multiply-adds of every layer's q, k, v, o, gate, up and down projections, one token."""
    h, d, inter = dims["hidden_size"], head_dim(dims), dims["intermediate_size"]
    nh, nkv = dims["num_heads"], dims["num_kv_heads"]
    per_layer = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * inter
    return 2.0 * dims["num_layers"] * per_layer


def lm_head_flops_per_token(dims: dict) -> float:
    return 2.0 * dims["hidden_size"] * dims["vocab"]


def attention_flops(dims: dict, queries: float, keys: float) -> float:
    """q k^T and p v, all layers: 4 L nh d (queries x keys) score entries' worth."""
    return 4.0 * dims["num_layers"] * dims["num_heads"] * head_dim(dims) * queries * keys


def forward_flops(dims: dict, batch: int, seq: float, causal: bool = True, logits: float | None = None) -> float:
    """One forward over `batch` sequences of `seq` tokens, logits at `logits` positions each (all).

    Causal attention counts the T (T + 1) / 2 scores a query-by-query mask keeps; `causal=False`
    counts all T^2, as a dense masked `q k^T` (transformers' eager attention) computes them.
    """
    logits = seq if logits is None else logits
    scores = seq * (seq + 1) / 2 if causal else seq * seq
    per_seq = seq * linear_flops_per_token(dims) + logits * lm_head_flops_per_token(dims)
    return batch * (per_seq + attention_flops(dims, 1, scores))


def generation_flops(dims: dict, batch: int, prompt_len: float, new_tokens: int) -> dict[str, float]:
    """Prefill of the prompt (logits at its last position only, as vLLM and HF generate make them)
    and N - 1 decode steps with a KV cache; the step that makes token t attends to P + t - 1 keys."""
    prefill = forward_flops(dims, batch, prompt_len, logits=1)
    per_step = linear_flops_per_token(dims) + lm_head_flops_per_token(dims)
    keys = sum(prompt_len + t - 1 for t in range(2, new_tokens + 1))
    decode = batch * ((new_tokens - 1) * per_step + attention_flops(dims, 1, keys))
    return {"prefill": prefill, "decode": decode}


def step_flops(dims: dict, workload: Workload, prompt_len: float) -> dict[str, float]:
    """FLOPs of one step by phase: generation, reference, old_logprobs, policy (and total)."""
    gen = generation_flops(dims, workload.batch, prompt_len, workload.new_tokens)
    forward = forward_flops(dims, workload.batch, prompt_len + workload.new_tokens)
    out = {"generation": gen["prefill"] + gen["decode"], "reference": forward, "old_logprobs": forward}
    out["policy"] = 3 * forward
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- measured rates


def matmul_shapes(dims: dict, rows: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of a forward's weight matmuls with M = `rows`: fused qkv, o, fused
    gate-up and down once per layer (as vLLM fuses them), lm_head once."""
    h, d, inter, L = dims["hidden_size"], head_dim(dims), dims["intermediate_size"], dims["num_layers"]
    nh, nkv = dims["num_heads"], dims["num_kv_heads"]
    return [
        (rows, h, (nh + 2 * nkv) * d, L),
        (rows, nh * d, h, L),
        (rows, h, 2 * inter, L),
        (rows, inter, h, L),
        (rows, h, dims["vocab"], 1),
    ]


STREAM_ROWS = 256  # up to this many rows a matmul is bound by reading its weight, not by FLOPs


def matmul_rate(
    dtype: str, shapes: Sequence[Sequence[int]], threads: int, repeats: int = 10, min_seconds: float = 0.5
) -> float:
    """FLOP/s of `torch.nn.functional.linear` over `shapes` ((M, K, N) or (M, K, N, count)) in
    `dtype` on `threads` threads: total FLOPs / total time, each shape's time the best of at least
    `repeats` timed runs (and at least `min_seconds` of them: on a shared machine the best run is
    the one nothing else interrupted) after a warm-up run. Cached per process.

    Up to STREAM_ROWS rows a run multiplies by `count` distinct weights, as a decode step reads
    each layer's own from memory (one weight, reused, would sit in cache); above, one weight
    stands for all `count` (compute bound: where the weight comes from hardly matters).
    """
    key = (dtype, tuple(tuple(s) for s in shapes), threads, repeats, min_seconds)
    return _matmul_rate(*key)


@functools.cache
def _matmul_rate(
    dtype: str, shapes: tuple[tuple[int, ...], ...], threads: int, repeats: int, min_seconds: float
) -> float:
    import torch
    import torch.nn.functional as F

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops = seconds = 0.0
        for m, k, n, *count in shapes:
            count = count[0] if count else 1
            copies = count if m <= STREAM_ROWS else 1
            x = torch.randn(m, k, dtype=torch_dtype)
            weights = [torch.randn(n, k, dtype=torch_dtype) for _ in range(copies)]
            with torch.no_grad():
                for w in weights:  # warm-up
                    F.linear(x, w)
                times: list[float] = []
                while len(times) < repeats or (sum(times) < min_seconds and len(times) < 100 * repeats):
                    t0 = time.perf_counter()
                    for w in weights:
                        F.linear(x, w)
                    times.append(time.perf_counter() - t0)
            flops += 2.0 * m * k * n * count
            seconds += min(times) * count / copies
            del x, weights
    finally:
        torch.set_num_threads(before)
    return flops / seconds


def matmul_dtype(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    return "float32" if precision == "float32" else "bfloat16"


def phase_rates(dims: dict, workload: Workload, prompt_len: float, dtype: str, threads: int) -> dict[str, float]:
    """Measured FLOP/s at the decode shapes (M = batch) and the training shapes (M = batch x seq)."""
    train_rows = round(workload.batch * (prompt_len + workload.new_tokens))
    return {
        "decode": matmul_rate(dtype, matmul_shapes(dims, workload.batch), threads),
        "training": matmul_rate(dtype, matmul_shapes(dims, train_rows), threads),
    }


# --------------------------------------------------------------------------- floor


def model_dims(size: str, vocab: int = VOCAB) -> dict:
    """The dims of peer_workload's SIZES[size]. Pass the model's real vocab: keel's tokenizer
    trained to VOCAB learns fewer tokens, and the model's vocab_size is len(tokenizer)."""
    return {**SIZES[size], "vocab": vocab}


@functools.cache
def measure_workload(size: str, seed: int = 0, prompts: int = 256) -> tuple[int, float]:
    """(vocab size, mean prompt tokens) of the workload's model and prompts, as Keel tokenises
    them (no chat template, the tokenizer's special tokens): builds the model in a temp dir."""
    import json

    from keel.data.prompts import encode_prompt
    from keel.models.loading import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="keel-roofline-") as tmp:
        path = make_model(Path(tmp) / "policy", size, seed)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        tok = load_tokenizer(str(path))
    lengths = [len(encode_prompt(tok, row["prompt"], False)[1]) for row in prompt_rows(prompts)]
    return vocab, statistics.mean(lengths)


def floor_seconds(
    size: str, workload: Workload, precision: str, prompt_len: float, threads: int = 2, vocab: int | None = None
) -> dict[str, float]:
    """Floor time of one step by phase (and total): FLOPs / measured matmul rate. The decode part
    of generation runs at the decode-shape rate, everything else at the training-shape rate.
    `vocab` defaults to the workload model's (measured once per process)."""
    vocab = vocab if vocab is not None else measure_workload(size, workload.seed, workload.prompts)[0]
    dims = model_dims(size, vocab)
    rates = phase_rates(dims, workload, prompt_len, matmul_dtype(precision), threads)
    gen = generation_flops(dims, workload.batch, prompt_len, workload.new_tokens)
    flops = step_flops(dims, workload, prompt_len)
    out = {
        "generation/prefill": gen["prefill"] / rates["training"],
        "generation/decode": gen["decode"] / rates["decode"],
    }
    out["generation"] = out["generation/prefill"] + out["generation/decode"]
    for phase in ("reference", "old_logprobs", "policy"):
        out[phase] = flops[phase] / rates["training"]
    out["total"] = out["generation"] + out["reference"] + out["old_logprobs"] + out["policy"]
    return out


# --------------------------------------------------------------------------- table


def _params(dims: dict) -> float:
    return (linear_flops_per_token(dims) + lm_head_flops_per_token(dims)) / 2 + dims["vocab"] * dims["hidden_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), action="append", help="repeatable; default: all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    print(f"load average before: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs: rates drop when it exceeds them)")
    for size in args.size or sorted(SIZES):
        workload = Workload(size=size)
        vocab, prompt_len = measure_workload(size, workload.seed, workload.prompts)
        dims = model_dims(size, vocab)
        flops = step_flops(dims, workload, prompt_len)
        gen = generation_flops(dims, workload.batch, prompt_len, workload.new_tokens)
        train_rows = round(workload.batch * (prompt_len + workload.new_tokens))
        print(
            f"\n## {size}: {_params(dims) / 1e6:.1f}M params, {dims['num_layers']} layers, hidden "
            f"{dims['hidden_size']}, vocab {vocab}; batch {workload.batch}, prompt {prompt_len:.2f} tokens "
            f"(mean), {workload.new_tokens} new tokens, {args.threads} threads\n"
        )
        print("| phase | GFLOP |\n|---|---|")
        split = f"{gen['prefill'] / 1e9:.2f} / {gen['decode'] / 1e9:.2f}"
        print(f"| generation (prefill / decode) | {flops['generation'] / 1e9:.2f} ({split}) |")
        for phase in ("reference", "old_logprobs", "policy", "total"):
            print(f"| {phase} | {flops[phase] / 1e9:.2f} |")

        print(f"\n| dtype | decode shapes (M={workload.batch}) GFLOP/s | training shapes (M={train_rows}) GFLOP/s |")
        print("|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            rates = phase_rates(dims, workload, prompt_len, dtype, args.threads)
            print(f"| {dtype} | {rates['decode'] / 1e9:.1f} | {rates['training'] / 1e9:.1f} |")

        print("\n| precision | generation s | reference s | old_logprobs s | policy s | floor step s | samples/s |")
        print("|---|---|---|---|---|---|---|")
        for precision in ("float32", "bfloat16"):
            floor = floor_seconds(size, workload, precision, prompt_len, args.threads, vocab)
            cells = " | ".join(f"{floor[p]:.3f}" for p in ("generation", "reference", "old_logprobs", "policy"))
            print(f"| {precision} | {cells} | {floor['total']:.3f} | {workload.batch / floor['total']:.1f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
