"""`keel bon`: best-of-n (rejection) sampling into an SFT dataset, on `keel train`'s rollout and reward roles.

Every prompt gets bon.n samples from the rollout workers (sampled as rollout.sampling says, n aside),
the reward actors score them, and the responses kept become the rows of a JSONL file that `keel sft`
reads with its default data fields:

    {"prompt_id": "17", "prompt": "3+4=", "response": "7", "score": 1.0, "sample": 5, "metadata": {...}}

bon.keep best keeps each prompt's highest-scored response (ties: the one sampled first); threshold
keeps every response scored at or above bon.threshold. A blank response is never kept (keel sft
refuses blank responses). `prompt` is the prompt file's text, before any chat template: keel sft
with the same data.apply_chat_template sees the prompts the policy saw.

The roles are placed and started as `keel train` starts them (keel.controller's placement,
RolloutPool, start_rewards and StatelessRole), from the run config `bon_run_config` makes of this
config: same resources, replicas, backends and threads, and a reward actor that is lost or hangs is
started again and its call sent again. The deadlines are keel train's defaults (a rollout call
300 s, a reward call 600 s: controller.rollout_timeout_s and score_timeout_s); bon.prompts_per_round
bounds what one call does. Prompts go out in rounds of bon.prompts_per_round, split across the
workers; worker i samples round r with seed sampling_seed + 1_000_003 r + 101 i, so a run is
repeatable.

The file is written once every prompt is scored, to a temporary file renamed over the output: a run
that is killed leaves no part of a dataset behind.

The best-of-k curve (`best_of_k_curve`) is shared with `keel eval` (EvalConfig.best_of_n).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keel.algo.best_of_n import best_of_first_k, best_of_k_unbiased, keep_mask, ladder
from keel.config import (
    BestOfNConfig,
    BonConfig,
    RunConfig,
    SamplingConfig,
    bon_run_config,
    bon_sampling,
    sampling_seed,
    tokenizer_path,
)
from keel.data.prompts import Prompt
from keel.reward.combine import combine
from keel.telemetry.console import NO_PROGRESS
from keel.trajectory import Trajectories

ROUND_SEED_STRIDE = 1_000_003  # seed distance between rounds (worker i adds 101 i, as a training rollout does)


def sample_grid(
    prompt_ids: list[str], sample_index: list[int], n: int, order: list[str] | None = None
) -> tuple[list[str], torch.Tensor]:
    """(the prompts, in `order` or else as first seen; (P, n) long: the batch row of each prompt's
    sample j). Raises ValueError unless every prompt has samples 0..n-1, each once."""
    order = order if order is not None else list(dict.fromkeys(prompt_ids))
    position = {pid: p for p, pid in enumerate(order)}
    if set(prompt_ids) != set(order):
        raise ValueError(f"samples of {len(set(prompt_ids))} prompts, {len(order)} expected")
    grid = torch.full((len(order), n), -1, dtype=torch.long)
    for row, (pid, j) in enumerate(zip(prompt_ids, sample_index, strict=True)):
        if not 0 <= j < n or grid[position[pid], j] >= 0:
            raise ValueError(f"prompt {pid}: sample {j} is not one of {n} distinct samples")
        grid[position[pid], j] = row
    if (grid < 0).any():
        pid = order[int((grid < 0).any(-1).nonzero()[0])]
        raise ValueError(f"prompt {pid}: fewer than {n} samples")
    return order, grid


def best_of_k_curve(traj: Trajectories, scores: torch.Tensor, task: list[float] | None, n: int) -> dict:
    """The best-of-k curve of a batch of n samples per prompt, for k in `ladder(n)`: the mean over
    prompts of the reward (and the task metric, when given) of the highest-rewarded of the first k
    samples (bon@k/reward, bon@k/task_metric), and the same over every k of the n samples
    (bon@k/reward_unbiased, bon@k/task_metric_unbiased; keel.algo.best_of_n.best_of_k_unbiased).
    `scores` and `task` are per sample, (B,)."""
    _, grid = sample_grid(traj.prompt_ids, traj.sample_index, n)
    s = scores.float()[grid]  # (P, n)
    measured = {"reward": s}
    if task is not None:
        measured["task_metric"] = torch.tensor(task, dtype=torch.float32)[grid]
    curve = {}
    for k in ladder(n):
        for name, values in measured.items():
            curve[f"bon@{k}/{name}"] = best_of_first_k(s, values, k)[0].mean().item()
            curve[f"bon@{k}/{name}_unbiased"] = best_of_k_unbiased(s, values, k)[0].mean().item()
    return curve


def format_curve(curve: dict, n: int) -> list[str]:
    """The curve as a table: a column per k, a row per measure (first k, then over every k-subset)."""
    ks = ladder(n)
    lines = ["best of k      " + "".join(f"{f'k={k}':>8}" for k in ks)]
    for name, label in (("reward", "reward"), ("task_metric", "task")):
        for suffix, how in (("", label), ("_unbiased", "  (all k of n)")):
            if f"bon@1/{name}{suffix}" in curve:
                lines.append(f"{how:<15}" + "".join(f"{curve[f'bon@{k}/{name}{suffix}']:8.3f}" for k in ks))
    return lines


# --------------------------------------------------------------------------- the roles


class Roles:
    """The rollout workers and reward actors of `keel bon`, placed and started as keel train does."""

    def __init__(self, cfg: RunConfig, pad_token_id: int, log=print):
        self.cfg = cfg
        self.pad_token_id = pad_token_id  # joins the workers' batches
        self.log = log
        self.groups: dict = {}
        self.pool = None  # RolloutPool
        self.reward = None  # StatelessRole

    def start(self, largest_batch: int) -> None:
        """Place both roles, start their actors and wait until all are ready (controller's deadlines)."""
        from keel.controller.actors import role_threads, thread_env
        from keel.controller.channels import grpc_token_env
        from keel.controller.placement import RoleRequest, node_cpus, place_roles
        from keel.controller.replicas import start_rewards
        from keel.controller.rollout_pool import RolloutPool
        from keel.controller.supervisor import StatelessRole, gather

        cfg, timeouts = self.cfg, self.cfg.controller
        requests = [
            RoleRequest("rollout", cfg.rollout.replicas, cfg.rollout.resources),
            RoleRequest("reward", cfg.reward.replicas, cfg.reward.resources),
        ]
        self.groups = place_roles(requests, timeouts.placement_timeout_s)
        grpc_env, group = grpc_token_env(cfg), self.groups["reward"]  # where a reward server source's token is
        envs = [
            {**grpc_env, **thread_env(role_threads(timeouts.mode, cfg.reward.resources, node_cpus(group, i)))}
            for i in range(cfg.reward.replicas)
        ]
        actors = start_rewards(cfg, group, envs, largest_batch)
        self.reward = StatelessRole("reward", actors, timeouts, log=self.log)
        self.pool = RolloutPool(cfg, self.groups["rollout"], grpc_env)
        self.pool.start(timeouts.start_timeout_s)
        calls = [(f"reward actor {i}", a.__ray_ready__.remote()) for i, a in enumerate(actors)]
        gather(calls, "start", None, timeouts.start_timeout_s, "controller.start_timeout_s")

    def sample_and_score(
        self, prompts: list[Prompt], seed: int, sampling: SamplingConfig, round_index: int
    ) -> Trajectories:
        """Every worker samples its share of `prompts` (n per prompt), the reward actors score the
        whole batch; the batch comes back with its scores."""
        import ray

        from keel.controller.channels import split
        from keel.controller.supervisor import gather

        workers = self.pool.workers
        chunks = [(w, c) for w, c in zip(workers, split(prompts, len(workers)), strict=True) if c]
        calls = [
            (f"rollout worker {i}", w.generate.remote(c, seed + i * 101, sampling)) for i, (w, c) in enumerate(chunks)
        ]
        timeout_s = self.cfg.controller.rollout_timeout_s
        parts = gather(calls, "best-of-n sampling", round_index, timeout_s, "controller.rollout_timeout_s")
        traj = Trajectories.concat(parts, self.pad_token_id)
        raw = self.reward.submit(traj, ray.put(traj), "score_trajectories_by_source", round_index).result()
        # the sources combined over the round's whole batch, as a training step combines them (a
        # whitened source is whitened over the batch, not per reward actor's shard)
        return traj.with_fields(scores=combine(raw, self.cfg.reward, traj.sample_ids).scores)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.pool is not None:
            self.pool.shutdown()
        if self.reward is not None:
            self.reward.close()
            for actor in self.reward.actors:
                ray.kill(actor)
        for pg in self.groups.values():
            remove_placement_group(pg)
        self.groups = {}


# --------------------------------------------------------------------------- selection and the dataset


@dataclass
class Tally:
    """What a run sampled and kept, for the summary."""

    prompts: int = 0
    samples: int = 0
    blank: int = 0  # blank responses (never kept)
    rows: list[dict] = field(default_factory=list)  # the dataset's rows, in prompt order
    score_sum: float = 0.0  # over every sample
    best_sum: float = 0.0  # over prompts: the highest score of each prompt's n samples
    curve_sums: dict[str, float] = field(default_factory=dict)  # bon@k/reward*, times each round's prompts

    def add(self, traj: Trajectories, prompts: list[Prompt], texts: dict[str, str], bon: BestOfNConfig) -> None:
        """One scored round of `prompts`: its kept rows, in prompt order, and its share of the summary."""
        n = bon.n
        order, grid = sample_grid(traj.prompt_ids, traj.sample_index, n, [p.prompt_id for p in prompts])
        scores = traj.scores[grid]  # (P, n)
        responses = [traj.responses[int(b)] for b in grid.flatten()]
        eligible = torch.tensor([bool(r.strip()) for r in responses]).view(grid.shape)
        kept = keep_mask(scores, bon.keep, bon.threshold, eligible)
        for p, pid in enumerate(order):
            for j in kept[p].nonzero().flatten().tolist():
                b = int(grid[p, j])
                self.rows.append(
                    {
                        "prompt_id": pid,
                        "prompt": texts[pid],
                        "response": traj.responses[b],
                        "score": scores[p, j].item(),
                        "sample": j,
                        "metadata": traj.metadata[b] if traj.metadata else {},
                    }
                )
        for key, value in best_of_k_curve(traj, traj.scores, None, n).items():
            self.curve_sums[key] = self.curve_sums.get(key, 0.0) + value * len(order)
        self.prompts += len(order)
        self.samples += len(traj)
        self.blank += int((~eligible).sum())
        self.score_sum += scores.sum().item()
        self.best_sum += scores.max(-1).values.sum().item()

    def summary(self, n: int) -> dict:
        kept = [row["score"] for row in self.rows]
        return {
            "prompts": self.prompts,
            "samples": self.samples,
            "rows": len(self.rows),
            "prompts_kept": len({row["prompt_id"] for row in self.rows}),
            "blank_responses": self.blank,
            "mean_score": self.score_sum / self.samples,
            "mean_best_score": self.best_sum / self.prompts,
            "mean_kept_score": sum(kept) / len(kept) if kept else None,
            "n": n,
            **{key: total / self.prompts for key, total in self.curve_sums.items()},
        }


def write_rows(rows: list[dict], path: Path) -> Path:
    """The dataset as JSONL, in one go: a temporary file renamed over `path`."""
    from keel.controller.checkpoint import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def format_summary(s: dict, keep: str) -> list[str]:
    mean_kept = "-" if s["mean_kept_score"] is None else f"{s['mean_kept_score']:.3f}"
    return [
        f"{s['prompts']} prompts x {s['n']} samples = {s['samples']} scored ({s['blank_responses']} blank); "
        f"kept {s['rows']} rows (keep {keep}) for {s['prompts_kept']} prompts",
        f"mean score {s['mean_score']:.3f} per sample, {s['mean_best_score']:.3f} best of {s['n']} per prompt; "
        f"kept rows {mean_kept}",
    ]


# --------------------------------------------------------------------------- the command


def run_bon(cfg: BonConfig, output: Path, log=print, progress=NO_PROGRESS) -> dict:
    """Sample, score, keep and write the dataset to `output`; returns the summary (also logged).
    Needs Ray initialised; raises DataError for a bad prompt file before any actor starts."""
    from keel.data.prompts import load_prompts, prompt_texts
    from keel.models.loading import load_tokenizer

    run_cfg = bon_run_config(cfg)
    bon = cfg.bon
    tokenizer = load_tokenizer(tokenizer_path(run_cfg))
    with progress.task("tokenize prompts"):
        loaded = load_prompts(cfg.data, tokenizer, cfg.model.max_prompt_tokens)
        texts = prompt_texts(cfg.data)
    if loaded.truncated or loaded.dropped:
        limit = cfg.model.max_prompt_tokens
        log(f"prompts: {loaded.truncated} truncated, {loaded.dropped} dropped (longer than {limit} tokens)")
    prompts = loaded.prompts[: bon.max_prompts or None]
    rounds = [prompts[i : i + bon.prompts_per_round] for i in range(0, len(prompts), bon.prompts_per_round)]
    sampling, seed = bon_sampling(cfg), sampling_seed(run_cfg)
    roles, tally = Roles(run_cfg, tokenizer.pad_token_id, log), Tally()
    try:
        with progress.task("start roles, load models"):
            roles.start(largest_batch=max(len(r) for r in rounds) * bon.n)
        with progress.task("sample and score", len(rounds)) as bar:
            for r, chunk in enumerate(rounds):
                traj = roles.sample_and_score(chunk, seed + r * ROUND_SEED_STRIDE, sampling, r)
                tally.add(traj, chunk, texts, bon)
                bar.advance()
    finally:
        roles.shutdown()
    summary = tally.summary(bon.n)
    for line in format_summary(summary, bon.keep) + format_curve(summary, bon.n):
        log(line)
    write_rows(tally.rows, output)
    return summary
