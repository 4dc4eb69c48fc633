"""End-to-end samples/s of async vs sync PPO on the demo task, in one run.

    .venv/bin/python benchmarks/async_vs_sync.py [--steps 20] [--backends vllm,hf] [--tokens 4,16]

The demo config (deploy/configs/demo.yaml) from a tiny warmed-up policy, run sync and then async
(max_staleness 1, off_policy tis) with the same seed, for each rollout backend and response
length. samples/s = samples / wall time over the steps after the first two (warm-up). Also
prints where a sync step's time goes, since async can only hide rollout time behind learning.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(policy, prompts, backend: str, tokens: int, mode: str, steps: int) -> tuple[float, dict]:
    from keel.config import parse_config
    from keel.controller.loop import Controller

    data = yaml.safe_load((ROOT / "deploy" / "configs" / "demo.yaml").read_text())
    data["model"]["policy"], data["data"]["prompts"] = str(policy), str(prompts)
    data["rollout"]["backend"] = backend
    data["rollout"]["sampling"]["max_new_tokens"] = tokens
    data["controller"]["steps"] = steps
    if mode == "async":
        data["controller"] |= {"mode": "async", "max_staleness": 1}
        data["algorithm"]["off_policy"] = "tis"
    cfg = parse_config(data)
    controller = Controller(cfg, Path(tempfile.mkdtemp()) / "run", log=lambda *_: None)
    controller.start()
    try:
        controller.step()
        controller.step()
        t0 = time.perf_counter()
        history = [controller.step() for _ in range(steps - 2)]
        elapsed = time.perf_counter() - t0
    finally:
        controller.shutdown()
    samples = sum(64 for _ in history)
    phases = {k[5:]: sum(m[k] for m in history) / len(history) for k in history[0] if k.startswith("time/")}
    return samples / elapsed, phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument("--tokens", default="4,16")
    args = parser.parse_args()

    import ray

    from keel.controller.actors import ROLE_ENV
    from keel.data.tasks import arithmetic_rows, write_jsonl
    from keel.models.tiny import make_tiny_model

    base = Path(tempfile.mkdtemp())
    policy = make_tiny_model(base / "policy", pretrain_steps=300)
    prompts = write_jsonl(arithmetic_rows(512), base / "prompts.jsonl")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": ROLE_ENV})
    rows = []
    for backend in args.backends.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            sync, phases = run(policy, prompts, backend, tokens, "sync", args.steps)
            asynch, _ = run(policy, prompts, backend, tokens, "async", args.steps)
            share = phases["rollout"] / sum(phases.values())
            rows.append((backend, tokens, sync, asynch, share))
    print(f"\nPPO on the demo task, 64 samples per step, {args.steps - 2} timed steps, 2 CPUs\n")
    print("| backend | max new tokens | sync samples/s | async samples/s | async / sync | rollout share (sync) |")
    print("|---|---|---|---|---|---|")
    for backend, tokens, sync, asynch, share in rows:
        print(f"| {backend} | {tokens} | {sync:.0f} | {asynch:.0f} | {asynch / sync:.2f}x | {share:.0%} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
