"""Where a PPO step's time goes on the demo task, vLLM vs HF rollout, measured in one run.

    .venv/bin/python benchmarks/ppo_step.py [--steps 20]

Builds the demo inputs in a temp dir, runs the demo config with each rollout backend on one
local Ray (2 CPUs), skips the first 2 steps (vLLM warm-up), and prints steps/s, samples/s and
the share of step time in rollout, scoring, advantages, learning and weight sync.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("rollout", "score", "advantages", "update", "weight_sync")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import ray

    from keel.config import parse_config
    from keel.controller.actors import ROLE_ENV
    from keel.controller.loop import Controller
    from keel.data.tasks import arithmetic_rows, write_jsonl
    from keel.models.tiny import make_tiny_model

    os.environ.update(ROLE_ENV)
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    policy = make_tiny_model(tmp / "policy", pretrain_steps=300)
    prompts = write_jsonl(arithmetic_rows(512), tmp / "prompts.jsonl")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": ROLE_ENV})
    rows = []
    for backend in ("vllm", "hf"):
        data = yaml.safe_load((ROOT / "deploy/configs/demo.yaml").read_text())
        data["model"]["policy"], data["data"]["prompts"] = str(policy), str(prompts)
        data["rollout"]["backend"] = backend
        data["controller"]["steps"] = args.steps
        cfg = parse_config(data)
        controller = Controller(cfg, tmp / f"run-{backend}", log=lambda *_: None)
        controller.start()
        try:
            history = controller.run()[2:]
        finally:
            controller.shutdown()
        step = statistics.mean(m["step_time"] for m in history)
        samples = statistics.mean(m["samples_per_s"] for m in history)
        shares = {p: statistics.mean(m[f"time/{p}"] / m["step_time"] for m in history) for p in PHASES}
        rows.append((backend, 1 / step, samples, shares))
    ray.shutdown()
    print(f"\nPPO step on the demo task ({args.steps - 2} timed steps, 64 samples/step, 2 CPUs)\n")
    print("| rollout backend | steps/s | samples/s | " + " | ".join(PHASES) + " |")
    print("|---|---|---|" + "---|" * len(PHASES))
    for backend, sps, samples, shares in rows:
        print(f"| {backend} | {sps:.2f} | {samples:.0f} | " + " | ".join(f"{shares[p]:.0%}" for p in PHASES) + " |")
    print(f"\nvLLM / HF samples/s ratio: {rows[0][2] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()
