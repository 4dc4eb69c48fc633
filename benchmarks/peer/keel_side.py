"""Keel's side of `benchmarks/peer_trl.py`: the peer workload as a Keel run config, run on one
local Ray with the machine's cores, returning per-step times and the step anatomy.

    .venv/bin/python benchmarks/peer/keel_side.py --model DIR --prompts FILE --out RESULT.json \
        [--precision full|mixed] [--backend vllm|hf] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

import peer_workload  # noqa: E402


def run_config(work: peer_workload.Workload, model: Path, prompts: Path, precision: str, backend: str) -> dict:
    """The workload in Keel's config: GRPO, KL k3 in the loss, one optimizer step per batch."""
    return {
        "name": "peer",
        "seed": work.seed,
        "model": {"policy": str(model), "dtype": "float32", "max_prompt_tokens": 32}
        | ({} if precision == "full" else {"precision": precision}),
        "data": {"prompts": str(prompts), "metadata_fields": ["answer"], "shuffle": True},
        "rollout": {
            "backend": backend,
            "resources": {"num_cpus": 0.5},
            "sampling": {
                "temperature": work.temperature,
                "max_new_tokens": work.new_tokens,
                "n": work.samples_per_prompt,
            },
            "vllm": {"gpu_memory_utilization": 0.2},
        },
        "reward": {
            "source": {"type": "function", "function": "peer_workload:digit_reward"},
            "resources": {"num_cpus": 0.25},
        },
        "reference": {"resources": {"num_cpus": 0.25}, "micro_batch_size": work.batch},
        "learner": {
            "resources": {"num_cpus": 1},
            "micro_batch_size": work.batch,
            "deepspeed": {"zero_stage": 0},
            "optimizer": {"lr": work.lr, "warmup_steps": 0, "schedule": "constant"},
        },
        "algorithm": {
            "estimator": "grpo",
            "kl": {"coef": work.kl_coef, "estimator": "k3", "placement": "loss"},
            "ppo_epochs": 1,
            "mini_batch_size": work.batch,
        },
        "controller": {"steps": work.steps, "prompts_per_step": work.prompts_per_step},
        "checkpoint": {"every_steps": 0},
    }


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """--set a.b.c=value (value parsed as YAML)."""
    import yaml

    for item in overrides:
        key, _, value = item.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return data


def run_keel(work: peer_workload.Workload, data: dict, cpus: int) -> dict:
    import ray

    from keel.config import parse_config
    from keel.controller.actors import ROLE_ENV
    from keel.controller.loop import Controller

    env = {**ROLE_ENV, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    os.environ.update(env)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        cfg = parse_config(data)
        controller = Controller(cfg, Path(tempfile.mkdtemp(prefix="keel-peer-")), log=lambda *_: None)
        controller.start()
        try:
            history = controller.run()
        finally:
            controller.shutdown()
    finally:
        ray.shutdown()
    steps = [m for m in history if "step_time" in m]
    times = [m["step_time"] for m in steps]
    phases = sorted({k for m in steps for k in m if k.startswith("time/")})
    shares = sorted({k for m in steps for k in m if k.startswith("anatomy/")})
    timed = steps[work.warmup :]
    return {
        "step_times": times,
        "rewards": [m["reward_mean"] for m in steps],
        "kl": [m.get("kl/mean", 0.0) for m in steps],  # per-token k3 in the loss, as TRL logs it
        "sequence_kl": [m["kl"] for m in steps],
        "logprob_gap": [m.get("rollout/logprob_gap_mean") for m in steps],
        "samples_per_s": peer_workload.steady_rate(times, work.batch, work.warmup),
        "phases": {p: sum(m.get(p, 0.0) for m in timed) / len(timed) for p in phases},
        "anatomy": {a: sum(m.get(a, 0.0) for m in timed) / len(timed) for a in shares},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default=peer_workload.Workload().to_json())
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--precision", default="full", choices=["full", "mixed"])
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = peer_workload.Workload.from_json(args.workload)
    data = apply_overrides(run_config(work, args.model, args.prompts, args.precision, args.backend), args.overrides)
    result = run_keel(work, data, args.cpus)
    args.out.write_text(json.dumps(result))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
