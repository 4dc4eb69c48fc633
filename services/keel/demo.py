"""`keel demo`: the whole alignment pipeline on a task a person can check, on a laptop's CPU.

Single-digit addition ("3+4=" -> "7"):

  base  a tiny Llama warmed up on arithmetic-and-English text: it writes numbers, mostly wrong.
  sft   fine-tuned on demonstrations, 30% of which give a wrong sum (imperfect demonstrators).
        It learns the facts, but sampling imitates the demonstrators' mistakes.
  rm    a reward model started from the SFT model, trained on preference pairs (the right sum
        over a wrong one, or over text).
  ppo   PPO from the SFT model against the learned reward model (not the rule), with the SFT
        model as the KL reference; every role a Ray actor.
  dpo   DPO from the SFT model on the same pairs, for comparison.

Every stage is evaluated on held-out prompts with the sampling PPO trains with (temperature 1):
task accuracy (by the rule), the reward model's reward, KL to the SFT model, and win rate
against the SFT model judged by the reward model. Greedy accuracy is reported beside it. Each
stage's config is written to <out>/configs/, so `keel sft|rm|dpo|train|eval --config` re-runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from keel.config import (
    DPOConfig,
    EvalConfig,
    RewardModelConfig,
    RunConfig,
    SFTConfig,
    dump_config,
    parse_config,
)

TASK_METRIC = "keel.reward.rules:arithmetic_exact"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of each stage (the defaults are what the README's table was measured with)."""

    pretrain_steps: int = 300
    sft_rows: int = 2000
    sft_wrong_share: float = 0.3
    sft_epochs: int = 10
    pair_rows: int = 4000
    rm_epochs: int = 16
    dpo_epochs: int = 2
    ppo_steps: int = 60
    ppo_prompts_per_step: int = 64
    eval_prompts: int = 200
    backend: str = "vllm"

    @classmethod
    def quick(cls) -> DemoPlan:
        """A reduced run for smoke tests: the same recipe, fewer steps and prompts."""
        return cls(sft_epochs=8, pair_rows=2400, ppo_steps=30, eval_prompts=100)

    def with_backend(self, backend: str) -> DemoPlan:
        return replace(self, backend=backend)


def _write(out: Path, name: str, cfg) -> Path:
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return path


def make_data(out: Path, plan: DemoPlan) -> dict[str, Path]:
    """The task's data: SFT demonstrations, preference pairs (train and held out), PPO prompts, eval prompts."""
    from keel.data import tasks

    data = out / "data"
    return {
        "sft": tasks.write_jsonl(
            tasks.arithmetic_sft_rows(plan.sft_rows, seed=1, wrong_share=plan.sft_wrong_share), data / "sft.jsonl"
        ),
        "pairs": tasks.write_jsonl(tasks.arithmetic_preference_rows(plan.pair_rows, seed=2), data / "pairs.jsonl"),
        "pairs_eval": tasks.write_jsonl(tasks.arithmetic_preference_rows(400, seed=3), data / "pairs_eval.jsonl"),
        "prompts": tasks.write_jsonl(tasks.arithmetic_rows(512, seed=5), data / "prompts.jsonl"),
        "eval_prompts": tasks.write_jsonl(
            tasks.arithmetic_rows(plan.eval_prompts, seed=99), data / "eval_prompts.jsonl"
        ),
    }


def stage_configs(out: Path, plan: DemoPlan, data: dict[str, Path]) -> dict:
    """Every stage's config, as the CLI would read it (deploy/configs/{sft,rm,ppo,dpo,eval}.yaml
    are these for out = runs/demo; a test keeps them equal)."""
    schedule = {"warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1}
    trainer = {"micro_batch_size": 32, "optimizer": {"lr": 1e-3, **schedule}}
    sft = SFTConfig.model_validate(
        {
            "model": {"path": str(out / "base")},
            "data": {"path": str(data["sft"]), "eval_fraction": 0.05, "max_tokens": 16},
            "trainer": trainer,
            "train": {"epochs": plan.sft_epochs, "batch_size": 32},
            "output_dir": str(out / "sft"),
        }
    )
    pairs = {"path": str(data["pairs"]), "eval_path": str(data["pairs_eval"]), "max_tokens": 16}
    rm_data = {**pairs, "margin_field": "margin"}
    rm = RewardModelConfig.model_validate(
        {
            "model": {"path": str(out / "sft")},
            "data": rm_data,
            # a low rate for many epochs: the RM must rank the right sum above every wrong one
            "trainer": {"micro_batch_size": 32, "optimizer": {"lr": 3e-4, **schedule}},
            "train": {"epochs": plan.rm_epochs, "batch_size": 32, "eval_every": 50},
            "output_dir": str(out / "rm"),
        }
    )
    dpo = DPOConfig.model_validate(
        {
            "model": {"path": str(out / "sft")},
            "data": pairs,
            "trainer": {"micro_batch_size": 32, "optimizer": {"lr": 2e-4, **schedule}},
            "train": {"epochs": plan.dpo_epochs, "batch_size": 32, "eval_every": 50},
            "dpo": {"beta": 0.1},
            "output_dir": str(out / "dpo"),
        }
    )
    ppo = parse_config(
        {
            "name": "demo-ppo",
            "model": {"policy": str(out / "sft"), "max_prompt_tokens": 16},
            "data": {"prompts": str(data["prompts"]), "metadata_fields": ["answer"]},
            "rollout": {
                "backend": plan.backend,
                "resources": {"num_cpus": 0.5},
                "sampling": {"temperature": 1.0, "max_new_tokens": 4},
            },
            "reward": {
                "source": {"type": "model", "path": str(out / "rm"), "batch_size": 64},
                "resources": {"num_cpus": 0.25},
            },
            "reference": {"resources": {"num_cpus": 0.25}},
            "learner": {
                "resources": {"num_cpus": 1},
                "micro_batch_size": 16,
                "optimizer": {"lr": 5e-4, "warmup_steps": 2},
                "critic": {"optimizer": {"lr": 1e-3}},
            },
            "algorithm": {"estimator": "gae", "kl": {"coef": 0.01}, "ppo_epochs": 2, "mini_batch_size": 32},
            "controller": {"steps": plan.ppo_steps, "prompts_per_step": plan.ppo_prompts_per_step},
            "logging": {"run_dir": str(out / "ppo")},
        }
    )
    evaluation = EvalConfig.model_validate(
        {
            "name": "demo-eval",
            "checkpoints": [
                {"name": "base", "path": str(out / "base")},
                {"name": "sft", "path": str(out / "sft")},
                {"name": "ppo", "path": str(out / "ppo" / "checkpoints" / "final")},
                {"name": "dpo", "path": str(out / "dpo")},
            ],
            "reference": str(out / "sft"),
            "data": {"prompts": str(data["eval_prompts"]), "metadata_fields": ["answer"]},
            "max_prompt_tokens": 16,
            "sampling": {"temperature": 1.0, "max_new_tokens": 4},
            "reward": {"source": {"type": "model", "path": str(out / "rm")}},
            "judge": str(out / "rm"),
            "task_metric": TASK_METRIC,
            "output": str(out / "eval.json"),
        }
    )
    return {"sft": sft, "rm": rm, "dpo": dpo, "ppo": ppo, "eval": evaluation}


def rm_top1_facts(rm_path: Path, max_operand: int = 9) -> int:
    """For how many facts a+b the reward model scores the right sum above every other possible sum.
    Pairwise accuracy can look high while this is low, and PPO climbs to the reward model's top answer."""
    from keel.config import RewardConfig, RewardModelSource
    from keel.reward.model import RewardModel

    rm = RewardModel(RewardConfig(source=RewardModelSource(path=str(rm_path), batch_size=256)))
    sums = [str(c) for c in range(2 * max_operand + 1)]
    right = 0
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            scores = rm.score([f"{a}+{b}="] * len(sums), sums)
            right += int(scores.argmax()) == a + b
    return right


def run_demo(out: Path, plan: DemoPlan, log=print) -> dict:
    """Run every stage into `out`; returns the summary (also written to out/summary.json)."""
    from keel.controller.actors import ROLE_ENV
    from keel.evaluation import evaluate, write_eval
    from keel.learner.dpo import DPOTrainer
    from keel.learner.reward_model import RewardModelTrainer
    from keel.learner.sft import SFTTrainer
    from keel.models.tiny import make_tiny_model

    for key, value in ROLE_ENV.items():
        os.environ.setdefault(key, value)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    histories: dict[str, list[dict]] = {}

    def stage(name: str, what: str):
        log(f"\n== {name}: {what}")
        return time.perf_counter()

    t = stage("base", f"tiny Llama warmed up for {plan.pretrain_steps} steps, and the task's data")
    make_tiny_model(out / "base", pretrain_steps=plan.pretrain_steps)
    data = make_data(out, plan)
    cfgs = stage_configs(out, plan, data)
    for name, cfg in cfgs.items():
        _write(out, name, cfg)
    timings["base"] = time.perf_counter() - t

    wrong = f"{plan.sft_wrong_share:.0%}"
    t = stage("sft", f"{plan.sft_rows} demonstrations ({wrong} with a wrong sum), {plan.sft_epochs} epochs")
    histories["sft"] = _offline(SFTTrainer, cfgs["sft"], out / "sft", "sft", log)
    timings["sft"] = time.perf_counter() - t

    t = stage("rm", f"reward model from the SFT model, {plan.pair_rows} preference pairs, {plan.rm_epochs} epochs")
    histories["rm"] = _offline(RewardModelTrainer, cfgs["rm"], out / "rm", "rm", log)
    top1 = rm_top1_facts(out / "rm")
    log(f"  the right sum scores above every other sum for {top1} of 100 facts")
    timings["rm"] = time.perf_counter() - t

    t = stage("ppo", f"PPO from the SFT model against the reward model, {plan.ppo_steps} steps, {plan.backend} rollout")
    histories["ppo"] = _run_ppo(cfgs["ppo"], out / "ppo", log)
    timings["ppo"] = time.perf_counter() - t

    t = stage("dpo", f"DPO from the SFT model on the same pairs, {plan.dpo_epochs} epoch(s)")
    histories["dpo"] = _offline(DPOTrainer, cfgs["dpo"], out / "dpo", "dpo", log)
    timings["dpo"] = time.perf_counter() - t

    t = stage("eval", f"every stage on {plan.eval_prompts} held-out prompts, sampled at temperature 1 and greedily")
    sampled = evaluate(cfgs["eval"], log=lambda line: log(f"  {line}"))
    write_eval(sampled, out / "eval.json")
    greedy_cfg = cfgs["eval"].model_copy(
        update={"sampling": cfgs["eval"].sampling.model_copy(update={"temperature": 0.0})}
    )
    greedy = evaluate(greedy_cfg.model_copy(update={"judge": None, "reward": None}), log=lambda line: None)
    write_eval(greedy, out / "eval_greedy.json")
    timings["eval"] = time.perf_counter() - t

    rm_acc = next(m["eval/rm/accuracy"] for m in reversed(histories["rm"]) if "eval/rm/accuracy" in m)
    rows = table_rows(sampled, greedy)
    plots = write_plots(out / "plots", histories)
    summary = {
        "rows": rows,
        "rm_heldout_pair_accuracy": rm_acc,
        "rm_top1_facts": top1,
        "timings_s": timings,
        "plan": plan.__dict__,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("\n" + format_table(rows, rm_acc, top1, timings))
    log(f"\nplots: {', '.join(str(p) for p in plots)}")
    log(f"run directory: {out}")
    return summary


def _held_out(kind: str, m: dict) -> str:
    shown = ", ".join(f"{k[len(kind) + 6 :]} {v:.3f}" for k, v in m.items() if k.startswith(f"eval/{kind}/"))
    return f"  step {m['step']}: held out: {shown}"


def _quiet(log, kind: str, every_s: float = 5.0):
    """Print an offline stage's data notes, and its evaluations at most every `every_s` seconds."""
    last = [0.0]

    def show(m: dict) -> None:
        if "note" in m:
            log(f"  data: {m['note']}")
        elif any(k.startswith("eval/") for k in m) and time.perf_counter() - last[0] >= every_s:
            last[0] = time.perf_counter()
            log(_held_out(kind, m))

    return show


def _offline(trainer_cls, cfg, out: Path, kind: str, log) -> list[dict]:
    from keel.learner.offline import open_run, run_offline

    # the demo makes its base model and data again on every run, so each stage starts afresh too
    history, _ = run_offline(trainer_cls, cfg, out, _quiet(log, kind), open_run(cfg, out, force_new=True))
    evals = [m for m in history if any(k.startswith("eval/") for k in m)]
    if evals:
        log(_held_out(kind, evals[-1]) + " (final)")
    return history


def _run_ppo(cfg: RunConfig, run_dir: Path, log) -> list[dict]:
    import ray

    from keel.controller.actors import ROLE_ENV
    from keel.controller.loop import Controller

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": ROLE_ENV})
    if run_dir.exists():
        shutil.rmtree(run_dir)
    controller = Controller(cfg, run_dir, log=lambda line: log(f"  {line}"))
    controller.start()
    every = max(1, cfg.controller.steps // 8)

    def show(m: dict) -> None:
        if m["step"] % every == 0 or m["step"] == cfg.controller.steps - 1:
            log(
                f"  step {m['step'] + 1:3d}: RM reward {m['reward_mean']:+.3f}  kl {m['kl']:.3f}  {m['step_time']:.2f}s"
            )

    try:
        history = controller.run(on_step=show)
    finally:
        controller.shutdown()
        if started:
            ray.shutdown()
    return history


def table_rows(sampled: dict, greedy: dict) -> list[dict]:
    greedy_by_name = {r["name"]: r for r in greedy["checkpoints"]}
    return [
        {
            "stage": r["name"],
            "task_accuracy": r["task_metric"],
            "greedy_accuracy": greedy_by_name[r["name"]]["task_metric"],
            "rm_reward": r["reward_mean"],
            "kl_to_sft": r["kl"],
            "win_rate_vs_sft": r["win_rate"],
        }
        for r in sampled["checkpoints"]
    ]


def format_table(rows: list[dict], rm_acc: float, top1: int, timings: dict[str, float]) -> str:
    lines = [
        "| stage | task accuracy (T=1) | greedy accuracy | RM reward | KL to SFT | win rate vs SFT |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['task_accuracy']:.3f} | {r['greedy_accuracy']:.3f} | {r['rm_reward']:+.2f} "
            f"| {r['kl_to_sft']:.3f} | {r['win_rate_vs_sft']:.3f} |"
        )
    lines.append(
        f"\nreward model: {rm_acc:.3f} of held-out preference pairs ranked right; "
        f"the right sum on top for {top1} of 100 facts"
    )
    lines.append(
        "time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f" (total {sum(timings.values()):.0f}s)"
    )
    return "\n".join(lines)


PLOTS = {
    "ppo": ["reward_mean", "kl", "policy/loss", "value/loss"],
    "sft": ["sft/loss", "eval/sft/loss", "sft/accuracy"],
    "rm": ["rm/loss", "rm/accuracy", "eval/rm/accuracy"],
    "dpo": ["dpo/loss", "dpo/accuracy", "eval/dpo/accuracy"],
}


def write_plots(out: Path, histories: dict[str, list[dict]]) -> list[Path]:
    """One PNG per stage that logged anything: each metric of PLOTS against the step."""
    from keel.telemetry.plots import plot_groups

    written = []
    for stage, keys in PLOTS.items():
        written += plot_groups(histories.get(stage, []), {stage: keys}, out, "keel demo")
    return written
