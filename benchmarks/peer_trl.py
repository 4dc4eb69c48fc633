"""Keel vs TRL's GRPOTrainer on the same workload on this machine, measured side by side in one run.

    .venv/bin/python benchmarks/peer_trl.py                       # 28M model, 32 new tokens, 12 steps
    .venv/bin/python benchmarks/peer_trl.py --size 100m --new-tokens 128 --prompts-per-step 4 --steps 4 \
        --warmup 1 --settings mixed

The workload is `peer_workload.Workload` (the same model, prompts, rule reward, batch shape, KL
and learning rate on both sides). TRL runs in its own environment (`.cache/peer-trl/venv`, made on
first use: `peer/trl_env.py`), never in Keel's. Each setting runs Keel and then TRL, one at a time,
each with every core of the machine:
  float32  TRL bf16=False           Keel model.precision full
  mixed    TRL bf16=True (autocast)  Keel model.precision mixed (bf16 matmuls, float32 weights)
It prints steady-state samples/s (steps after --warmup), the Keel/TRL ratio per setting and
against TRL's best, the reward and KL at the first and last step, each step time as a multiple of
the roofline floor (`roofline.py`: the FLOPs of generation, reference forward and policy forward +
backward at this machine's measured matmul rate), and where Keel's step time went.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import peer_workload  # noqa: E402
import roofline  # noqa: E402
from peer.trl_env import ensure_trl_env, run_trl  # noqa: E402

SETTINGS = {"float32": ("full", "float32"), "mixed": ("mixed", "bf16")}  # name -> (Keel precision, TRL precision)
ANATOMY = ("rollout", "reward", "reference", "learner", "controller")


def run_keel(work, model: Path, prompts: Path, precision: str, out: Path, backend: str, overrides: list[str]) -> dict:
    """One Keel run of `work` (peer/keel_side.py in a process of its own, with a Ray of its own)."""
    cmd = [sys.executable, str(BENCH / "peer" / "keel_side.py"), "--workload", work.to_json(), "--model", str(model)]
    cmd += ["--prompts", str(prompts), "--precision", precision, "--backend", backend, "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"keel_side.py ({precision}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="28m", choices=sorted(peer_workload.SIZES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts-per-step", type=int, default=8, help="each gets 4 samples")
    parser.add_argument("--settings", default="float32,mixed", help="comma-separated: float32, mixed")
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="Keel's rollout backend")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Keel config key=value")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, help="keep models, prompts and results here (default: a temp dir)")
    args = parser.parse_args()
    settings = args.settings.split(",")
    work = peer_workload.Workload(
        size=args.size,
        steps=args.steps,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        prompts_per_step=args.prompts_per_step,
    )

    tmp = args.work or Path(tempfile.mkdtemp(prefix="keel-peer-"))
    model = tmp / f"model-{args.size}"
    if not (model / "config.json").exists():
        peer_workload.make_model(model, args.size, work.seed)
    prompts = peer_workload.write_prompts(tmp / "prompts.jsonl", work.prompts)
    python = ensure_trl_env(ROOT)

    results = {}
    for name in settings:
        keel_precision, trl_precision = SETTINGS[name]
        print(f"[{name}] Keel ...", flush=True)
        keel = run_keel(work, model, prompts, keel_precision, tmp / f"keel-{name}.json", args.backend, args.overrides)
        print(f"[{name}] Keel {keel['samples_per_s']:.2f} samples/s; TRL ...", flush=True)
        trl = run_trl(python, work, model, prompts, trl_precision, args.threads, tmp)
        print(f"[{name}] TRL {trl['samples_per_s']:.2f} samples/s", flush=True)
        results[name] = (keel, trl)

    vocab, prompt_len = roofline.measure_workload(args.size, work.seed, work.prompts)
    floors = {}
    for name in settings:
        floor = roofline.floor_seconds(args.size, work, name, prompt_len, args.threads, vocab)
        floors[name] = floor["total"] - floor["old_logprobs"]  # a one-pass update needs no log-prob pass
    best_trl = max(trl["samples_per_s"] for _, trl in results.values())

    print(
        f"\nKeel vs TRL {results[settings[0]][1].get('trl_version', '?')} GRPO, {args.size} Llama, "
        f"{work.prompts_per_step} prompts x {work.samples_per_prompt} samples x {work.new_tokens} new tokens per "
        f"step, {work.steps} steps ({work.steps - work.warmup} timed), {args.threads} threads, Keel rollout "
        f"{args.backend}\n"
    )
    print(
        "| setting | TRL samples/s | Keel samples/s | Keel / TRL | Keel / TRL best | floor s/step | "
        "TRL x floor | Keel x floor | reward first -> last (TRL / Keel) | KL per token, last (TRL / Keel) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (keel, trl) in results.items():
        batch = work.batch
        trl_step, keel_step = batch / trl["samples_per_s"], batch / keel["samples_per_s"]
        print(
            f"| {name} | {trl['samples_per_s']:.2f} | {keel['samples_per_s']:.2f} | "
            f"{keel['samples_per_s'] / trl['samples_per_s']:.2f}x | {keel['samples_per_s'] / best_trl:.2f}x | "
            f"{floors[name]:.2f} | {trl_step / floors[name]:.1f}x | {keel_step / floors[name]:.1f}x | "
            f"{trl['rewards'][0]:.3f} -> {trl['rewards'][-1]:.3f} / "
            f"{keel['rewards'][0]:.3f} -> {keel['rewards'][-1]:.3f} | "
            f"{trl['kl'][-1]:.3f} / {keel['kl'][-1]:.3f} |"
        )
    print("\nKeel's step anatomy (mean over timed steps): seconds per phase, and each role's busy share\n")
    phases = ("rollout", "score", "old_logprobs", "update", "weight_sync")
    print("| setting | step s | " + " | ".join(phases) + " | " + " | ".join(f"{r} busy" for r in ANATOMY) + " |")
    print("|---|---|" + "---|" * (len(phases) + len(ANATOMY)))
    for name, (keel, _) in results.items():
        mean = keel["phases"]
        step = work.batch / keel["samples_per_s"]
        cells = [f"{mean.get(f'time/{p}', 0.0):.2f}" for p in phases]
        cells += [f"{keel['anatomy'].get(f'anatomy/{r}_busy', 0.0):.0%}" for r in ANATOMY]
        print(f"| {name} | {step:.2f} | " + " | ".join(cells) + " |")
    (tmp / "peer_trl.json").write_text(json.dumps({n: {"keel": k, "trl": t} for n, (k, t) in results.items()}))
    print(f"\nraw results: {tmp / 'peer_trl.json'}")


if __name__ == "__main__":
    main()
