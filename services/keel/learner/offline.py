"""Offline trainers (SFT, reward model, DPO): the loop they share, one DeepSpeed rank each.

A trainer is a plain class for one data-parallel rank. `fit` runs the epochs. Every rank sees
the same seeded order and the same global batch each optimizer step, and trains on its own
slice in micro-batches. A micro-batch's loss is its *sum* over loss units (tokens for SFT,
pairs for RM and DPO), divided by the units in the whole global batch. The gradient is then
the exact mean over the global batch however it is split across ranks and micro-batches
(DeepSpeed divides by the accumulation steps and averages over ranks; the loss is scaled back
by both). Metrics are summed the same way and reduced over ranks.

`run_offline` runs a trainer in this process (one rank) or as `trainer.replicas` Ray actors.
"""

from __future__ import annotations

import json
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from keel.config import OfflineRun, dump_config
from keel.data.rows import DataError, Row, read_rows, split_rows
from keel.learner.learner import full_state_dict, init_distributed, make_engine, step_engine
from keel.models.loading import load_tokenizer


class OfflineTrainer(ABC):
    kind: str  # metric namespace and log prefix: "sft", "rm", "dpo"

    def __init__(self, cfg: OfflineRun):
        self.cfg = cfg
        self.rank, self.world = init_distributed(cfg.trainer.deepspeed.backend)
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        self.notes: list[str] = []  # what data loading did (truncated / dropped rows), for the log
        train_rows, eval_rows = self._rows()
        self.train_items = self.prepare(train_rows, "train")
        self.eval_items = self.prepare(eval_rows, "eval") if eval_rows else []
        batch = cfg.train.batch_size
        if len(self.train_items) < batch:
            raise DataError(
                f"{cfg.data.path}: {len(self.train_items)} usable training rows, fewer than train.batch_size {batch}"
            )
        per_epoch = len(self.train_items) // batch
        self.total_steps = per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        module = self.build_model()
        if cfg.trainer.gradient_checkpointing:
            module.gradient_checkpointing_enable()
        trainer = cfg.trainer
        self.engine = make_engine(
            module, trainer, trainer.optimizer, cfg.model.dtype, self.world, batch, self.total_steps
        )
        self.step = 0

    # ------------------------------------------------------------------ what each trainer defines

    @abstractmethod
    def prepare(self, rows: list[Row], split: str) -> list:
        """Rows -> training items (examples or pairs); notes what was truncated or dropped."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The module to train (loaded from cfg.model.path)."""

    @abstractmethod
    def units(self, item) -> int:
        """How many loss units an item holds (tokens for SFT, 1 per pair)."""

    @abstractmethod
    def loss_sums(self, items: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the items' units, {metric: value summed over units}) on self.engine."""

    # ------------------------------------------------------------------ the loop

    def _rows(self) -> tuple[list[Row], list[Row]]:
        data = self.cfg.data
        rows = read_rows(data.path, data.format)
        if data.eval_path:
            return rows, read_rows(data.eval_path, data.format)
        return split_rows(rows, data.eval_fraction, self.cfg.seed)

    def note(self, split: str, built) -> None:
        if built.truncated or built.dropped:
            limit = self.cfg.data.max_tokens
            self.notes.append(f"{split}: {built.truncated} truncated, {built.dropped} dropped (over {limit} tokens)")

    def batches(self):
        """The global batches of every epoch, in a seeded order; the last partial batch is skipped."""
        size = self.cfg.train.batch_size
        for epoch in range(self.cfg.train.epochs):
            order = list(range(len(self.train_items)))
            if self.cfg.train.shuffle:
                random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
            for start in range(0, len(order) - size + 1, size):
                yield epoch, [self.train_items[i] for i in order[start : start + size]]

    def fit(self, out_dir: str | Path, log: Callable[[dict], None] | None = None) -> list[dict]:
        """Train, evaluating as configured; rank 0 writes metrics.jsonl and the HF model to out_dir."""
        out = Path(out_dir)
        history: list[dict] = []
        metrics_file = None
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "keel_config.yaml").write_text(dump_config(self.cfg))
            metrics_file = open(out / "metrics.jsonl", "w")

        def record(m: dict) -> None:
            history.append(m)
            if metrics_file:
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
            if log and self.rank == 0:
                log(m)

        every = self.cfg.train.eval_every
        last_epoch = 0
        for epoch, batch in self.batches():
            if self.step >= self.total_steps:
                break
            if epoch != last_epoch and not every and self.eval_items:
                record({"step": self.step, "epoch": last_epoch, **self.evaluate()})
            last_epoch = epoch
            record({"step": self.step + 1, "epoch": epoch, **self.train_step(batch)})
            self.step += 1
            if every and self.step % every == 0 and self.eval_items:
                record({"step": self.step, "epoch": epoch, **self.evaluate()})
        if self.eval_items and not (every and self.step % every == 0):
            record({"step": self.step, "epoch": last_epoch, **self.evaluate()})
        self.save(out)
        if metrics_file:
            metrics_file.close()
        return history

    def train_step(self, batch: list) -> dict[str, float]:
        t0 = time.perf_counter()
        total = sum(self.units(x) for x in batch)
        per_rank = len(batch) // self.world
        mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        micro = self.cfg.trainer.micro_batch_size
        scale = (per_rank // micro) * self.world / max(total, 1)  # see the module docstring
        self.engine.train()
        sums: dict[str, float] = {}
        extra: dict[str, float] = {}
        for start in range(0, per_rank, micro):
            loss, metrics = self.loss_sums(mine[start : start + micro])
            self.engine.backward(loss * scale)
            extra.update(step_engine(self.engine, f"{self.kind}/grad_norm"))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out = {k: v / max(total, 1) for k, v in self._reduce(sums).items()}
        out[f"{self.kind}/lr"] = self.engine.get_lr()[0]
        out["time/step_s"] = time.perf_counter() - t0
        return {**out, **extra}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics over the held-out items, reduced over ranks, as eval/<name>."""
        usable = len(self.eval_items) - len(self.eval_items) % self.world  # equal shares (ZeRO-3 forward is collective)
        mine = self.eval_items[self.rank : usable : self.world]
        micro = self.cfg.trainer.micro_batch_size
        self.engine.eval()
        sums: dict[str, float] = {}
        for start in range(0, len(mine), micro):
            _, metrics = self.loss_sums(mine[start : start + micro])
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.engine.train()
        total = sum(self.units(x) for x in self.eval_items[:usable])
        reduced = self._reduce(sums)
        return {f"eval/{k}": v / max(total, 1) for k, v in reduced.items()} | {"eval/rows": float(usable)}

    def _reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum each metric over ranks (every rank holds the same keys)."""
        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def save(self, out: Path) -> None:
        """The trained model in HF format (with the tokenizer) at `out`, written by rank 0."""
        state = full_state_dict(self.engine)  # a collective under ZeRO-3
        if self.rank == 0:
            self.engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out)


def output_dir(cfg: OfflineRun, override: str | None = None) -> Path:
    return Path(override or cfg.output_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_offline(
    trainer_cls: type[OfflineTrainer], cfg: OfflineRun, out: Path, log: Callable[[dict], None] | None = None
) -> tuple[list[dict], list[str]]:
    """Train with `trainer.replicas` ranks: in this process for one, as Ray actors for more.

    Returns (rank 0's metric history, its data notes)."""
    if cfg.trainer.replicas == 1:
        import torch.distributed

        from keel.controller.actors import free_port

        if not torch.distributed.is_initialized():
            # a process group of one on a free port: a MASTER_PORT inherited from a parent (which may
            # be holding that port itself) must not be reused
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
            os.environ.update({**env, "LOCAL_RANK": "0"})
        trainer = trainer_cls(cfg)
        if log:
            for line in trainer.notes:
                log({"note": line})
        return trainer.fit(out, log), trainer.notes
    return _run_on_ray(trainer_cls, cfg, out)


def _run_on_ray(trainer_cls: type[OfflineTrainer], cfg: OfflineRun, out: Path) -> tuple[list[dict], list[str]]:
    import ray

    from keel.controller.actors import free_port, remote
    from keel.controller.placement import RoleRequest, in_group, place_roles

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    t = cfg.trainer
    groups = place_roles([RoleRequest("trainer", t.replicas, t.resources)], 120.0)
    port = free_port()
    ranks = []
    for rank in range(t.replicas):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank)}
        env |= {"WORLD_SIZE": str(t.replicas), "LOCAL_RANK": "0"}
        ranks.append(remote(_Rank, t.resources, env, in_group(groups["trainer"], rank)).remote(trainer_cls, cfg))
    try:
        results = ray.get([r.fit.remote(str(out)) for r in ranks])
    finally:
        from ray.util.placement_group import remove_placement_group

        for r in ranks:
            ray.kill(r)
        remove_placement_group(groups["trainer"])
    return results[0]


class _Rank:
    """A trainer rank as a Ray actor."""

    def __init__(self, trainer_cls: type[OfflineTrainer], cfg: OfflineRun):
        self.trainer = trainer_cls(cfg)

    def fit(self, out: str) -> tuple[list[dict], list[str]]:
        return self.trainer.fit(out), self.trainer.notes
