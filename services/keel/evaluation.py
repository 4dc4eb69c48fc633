"""`keel eval`: held-out prompts through one or more policies, scored several ways.

For each checkpoint, on the same prompts with the same sampling:
- reward_mean: the configured reward (model or function), as PPO sees it;
- kl: mean over samples of sum_t [log pi(a_t) - log pi_ref(a_t)] on the policy's own samples
  (the k1 estimate of KL(pi || pi_ref) per sequence, at the sampling temperature);
- response_length: generated tokens per sample;
- task_metric: the mean of a per-sample 0/1 function (exact match on the demo task);
- win_rate: a judge reward model compares each answer with the reference policy's answer to the
  same prompt (sample j against sample j): a win counts 1, a tie (equal scores) 0.5, a loss 0.
  wins, ties and losses are reported too;
- with best_of_n, the best-of-k curve of the same samples (best_of_n per prompt), for k = 1, 2,
  4, ... up to it: bon@k/reward and bon@k/task_metric, the reward and the task metric of the
  highest-rewarded of each prompt's first k samples, and their _unbiased twins over every k of
  the n samples (`keel.bon.best_of_k_curve`), printed as a table.

Everything runs in this process (HF generate by default; vLLM with backend: vllm).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from keel.bon import best_of_k_curve, format_curve
from keel.config import (
    EvalConfig,
    ModelConfig,
    RewardConfig,
    RewardModelSource,
    RolloutConfig,
    eval_sampling,
)
from keel.telemetry.console import NO_PROGRESS
from keel.trajectory import Trajectories

TIE_EPS = 1e-6


def _generate(cfg: EvalConfig, path: str, prompts, max_len: int) -> Trajectories:
    from keel.rollout.worker import RolloutWorker

    worker = RolloutWorker(
        ModelConfig(policy=path, tokenizer=cfg.reference, max_prompt_tokens=cfg.max_prompt_tokens),
        RolloutConfig(backend=cfg.backend, sampling=eval_sampling(cfg)),
        max_len,
        cfg.seed,
        worker_id="eval",
    )
    traj = worker.generate(prompts, cfg.seed)
    del worker
    gc.collect()
    return traj


def win_tie_loss(scores: torch.Tensor, baseline: torch.Tensor) -> tuple[int, int, int]:
    """Counts of scores above, equal to (within TIE_EPS) and below the baseline's, element-wise."""
    diff = scores - baseline
    ties = int((diff.abs() <= TIE_EPS).sum())
    wins = int((diff > TIE_EPS).sum())
    return wins, ties, len(diff) - wins - ties


def evaluate(cfg: EvalConfig, log=print, progress=NO_PROGRESS) -> dict:
    """Evaluate every checkpoint; returns the eval.json content. `progress` (keel.telemetry.console)
    shows the long operations: tokenization, model loading, each checkpoint's evaluation."""
    from keel.data.prompts import load_prompts
    from keel.models.loading import load_tokenizer
    from keel.reference.model import ReferenceModel
    from keel.reward.model import RewardModel, import_function

    tokenizer = load_tokenizer(cfg.reference)
    with progress.task("tokenize prompts"):
        prompts = load_prompts(cfg.data, tokenizer, cfg.max_prompt_tokens)
    if prompts.truncated or prompts.dropped:
        limit = cfg.max_prompt_tokens
        log(f"prompts: {prompts.truncated} truncated, {prompts.dropped} dropped (longer than {limit} tokens)")
    chosen = prompts.prompts[: cfg.max_prompts or None]
    max_len = cfg.max_prompt_tokens + cfg.sampling.max_new_tokens
    temperature = cfg.sampling.temperature or 1.0
    with progress.task("load the reference, reward and judge"):
        reference = ReferenceModel(cfg.reference, temperature=temperature)
        reward = RewardModel(cfg.reward) if cfg.reward else None
        judge = RewardModel(RewardConfig(source=RewardModelSource(path=cfg.judge))) if cfg.judge else None
    task = import_function(cfg.task_metric) if cfg.task_metric else None

    baseline = None
    if judge is not None:  # the reference policy's own answers, judged once
        with progress.task("judge the reference's answers"):
            baseline = judge.score_trajectories(_generate(cfg, cfg.reference, chosen, max_len))

    results = []
    with progress.task("evaluate checkpoints", len(cfg.checkpoints)) as bar:
        for ck in cfg.checkpoints:
            row = _evaluate_one(cfg, ck, chosen, max_len, reference, reward, task, judge, baseline)
            results.append(row)
            log(format_row(row))
            if cfg.best_of_n:
                for line in format_curve(row, cfg.best_of_n):
                    log(f"  {line}")
            bar.advance()
    return {
        "name": cfg.name,
        "reference": cfg.reference,
        "prompts": len(chosen),
        "prompts_truncated": prompts.truncated,
        "prompts_dropped": prompts.dropped,
        "sampling": cfg.sampling.model_dump(),
        "task_metric": cfg.task_metric,
        "judge": cfg.judge,
        **({"best_of_n": cfg.best_of_n} if cfg.best_of_n else {}),
        "checkpoints": results,
    }


def _evaluate_one(cfg: EvalConfig, ck, chosen, max_len: int, reference, reward, task, judge, baseline) -> dict:
    """One checkpoint's row of eval.json: its answers to `chosen`, measured and scored."""
    t0 = time.perf_counter()
    traj = _generate(cfg, ck.path, chosen, max_len)
    mask = traj.response_mask.float()
    log_ratio = (traj.behaviour_logprobs - reference.logprobs(traj)) * mask
    row = {
        "name": ck.name,
        "path": ck.path,
        "samples": len(traj),
        "kl": log_ratio.sum(-1).mean().item(),
        "response_length": mask.sum(-1).mean().item(),
    }
    scores = values = None
    if reward is not None:
        scores = reward.score_trajectories(traj)
        row["reward_mean"] = scores.mean().item()
    if task is not None:
        values = [float(v) for v in task(traj.prompts, traj.responses, traj.metadata)]
        row["task_metric"] = sum(values) / len(values)
    if cfg.best_of_n:
        row |= best_of_k_curve(traj, scores, values, cfg.best_of_n)
    if judge is not None:
        wins, ties, losses = win_tie_loss(judge.score_trajectories(traj), baseline)
        row |= {"win_rate": (wins + 0.5 * ties) / len(traj), "wins": wins, "ties": ties, "losses": losses}
    row["examples"] = [{"prompt": p, "response": r} for p, r in zip(traj.prompts[:5], traj.responses[:5], strict=True)]
    row["time_s"] = time.perf_counter() - t0
    return row


def format_row(row: dict) -> str:
    parts = [f"{row['name']}:"]
    if "task_metric" in row:
        parts.append(f"task {row['task_metric']:.3f}")
    if "reward_mean" in row:
        parts.append(f"reward {row['reward_mean']:+.3f}")
    parts.append(f"kl {row['kl']:.3f}")
    parts.append(f"len {row['response_length']:.1f}")
    if "win_rate" in row:
        parts.append(f"win {row['win_rate']:.3f} ({row['wins']}/{row['ties']}/{row['losses']} w/t/l)")
    return "  ".join(parts)


def write_eval(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
