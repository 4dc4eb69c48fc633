"""Offline trainers (SFT, reward model, DPO): the loop they share, one DeepSpeed rank each.

A trainer is a plain class for one data-parallel rank. `fit` runs the epochs. Every rank sees
the same seeded order and the same global batch each optimizer step, and trains on its own
slice in micro-batches. A micro-batch's loss is its *sum* over loss units (tokens for SFT,
pairs for RM and DPO), divided by the units in the whole global batch. The gradient is then
the exact mean over the global batch however it is split across ranks and micro-batches
(DeepSpeed divides by the accumulation steps and averages over ranks; the loss is scaled back
by both). Metrics are summed the same way and reduced over ranks.

Checkpoints (`checkpoint.every_steps`) go to <out>/checkpoints/ through `CheckpointStore`, atomically:
every rank's DeepSpeed state (module, optimizer, LR schedule) and RNG states, and a state.json with
the steps done, their epoch, a digest of the training rows and the config. The batches are a pure
function of the seed, the epoch and the rows, so a resumed run skips the first `step` of them and
goes on with exactly the batches and optimizer state the uninterrupted run would have had. The end
of a run commits a checkpoint marked finished that holds only its state.json: the HF model in <out>
is the result, and nothing continues from it.

`open_run` decides where a run in an output directory starts: from its latest checkpoint, afresh,
or not at all (finished). `run_offline` runs a trainer in this process (one rank) or as
`trainer.replicas` Ray actors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from keel.config import OfflineRun, dump_config
from keel.controller.checkpoint import CheckpointStore, cut_metrics, resume_point
from keel.data.rows import DataError, Row, read_rows, split_rows
from keel.learner.learner import (
    full_state_dict,
    init_distributed,
    load_engine,
    make_engine,
    rng_state,
    save_engine,
    set_rng_state,
    step_engine,
)
from keel.models.loading import apply_lora, load_tokenizer, parameter_counts
from keel.telemetry.console import NO_PROGRESS
from keel.telemetry.sinks import open_sinks

STOP_FILE = "STOP"  # made in the output directory by `keel`'s signal handler: stop at the next step, with a checkpoint


class OfflineTrainer(ABC):
    kind: str  # metric namespace and log prefix: "sft", "rm", "dpo"

    def __init__(self, cfg: OfflineRun, progress=NO_PROGRESS):
        self.cfg = cfg
        self.progress = progress  # long operations (keel.telemetry.console): tokenization, model load, training
        self.rank, self.world = init_distributed(cfg.trainer.deepspeed.backend, cfg.trainer.deepspeed.timeout_s)
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        self.notes: list[str] = []  # what data loading did (truncated / dropped rows), for the log
        train_rows, eval_rows = self._rows()
        self.data_digest = rows_digest(train_rows)  # a resumed run refuses rows that changed
        with progress.task(f"{self.kind}: tokenize rows"):
            self.train_items = self.prepare(train_rows, "train")
            self.eval_items = self.prepare(eval_rows, "eval") if eval_rows else []
        batch = cfg.train.batch_size
        if len(self.train_items) < batch:
            raise DataError(
                f"{cfg.data.path}: {len(self.train_items)} usable training rows, fewer than train.batch_size {batch}"
            )
        self.steps_per_epoch = len(self.train_items) // batch
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        with progress.task(f"{self.kind}: load model"):
            module = self.build_model()
        if cfg.trainer.gradient_checkpointing:
            module.gradient_checkpointing_enable()
        # model.lora: only the adapters train (and go to the optimizer); the output is adapter + merged model
        self.lora = cfg.model.lora is not None
        if self.lora:
            module = apply_lora(module, cfg.model.lora)
        self.params = parameter_counts(module) if self.lora else {}
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
        """The global batches of every epoch, in a seeded order; the last partial batch is skipped. A pure
        function of the seed, the epoch and the rows: a resumed run skips those it trained on."""
        size = self.cfg.train.batch_size
        for epoch in range(self.cfg.train.epochs):
            order = list(range(len(self.train_items)))
            if self.cfg.train.shuffle:
                random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
            for start in range(0, len(order) - size + 1, size):
                yield epoch, [self.train_items[i] for i in order[start : start + size]]

    def fit(
        self, out_dir: str | Path, log: Callable[[dict], None] | None = None, resume: str | Path | None = None
    ) -> list[dict]:
        """Train from the first step, or from the checkpoint `resume` (see `open_run`), evaluating and
        checkpointing as configured; rank 0 logs the metrics (out_dir/metrics.jsonl and the trackers of
        logging.trackers: keel.telemetry.sinks) and writes the HF model to out_dir. Returns the metrics
        this call recorded."""
        out = Path(out_dir)
        store = CheckpointStore(out / "checkpoints", self.cfg.checkpoint.keep_last)
        if resume:
            self.load_checkpoint(Path(resume))
        history: list[dict] = []
        sinks = None
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            sinks = open_sinks(self.cfg.logging, out, self.cfg.name, self.cfg.model_dump(mode="json"), bool(resume))
        with sinks or nullcontext(), self.progress.task(f"{self.kind}: train", self.total_steps, self.step) as bar:

            def record(m: dict) -> None:
                history.append(m)
                if sinks:
                    sinks.write(m, m["step"])
                if log and self.rank == 0:
                    log(m)

            every = self.cfg.checkpoint.every_steps
            # a checkpoint comes after its step's evaluation, so a resumed run repeats no metric line
            for epoch, batch in islice(self.batches(), self.step, self.total_steps):
                record({"step": self.step + 1, "epoch": epoch, **self.train_step(batch)})
                self.step += 1
                bar.update(self.step)
                if self.eval_items and self.eval_due(self.step):
                    record({"step": self.step, "epoch": epoch, **self.evaluate()})
                if every and self.step % every == 0 and self.step < self.total_steps:
                    self.save_checkpoint(store)
                if self.step < self.total_steps and self.stop_requested(out):
                    if not (every and self.step % every == 0):
                        self.save_checkpoint(store)
                    return history
            if self.eval_items and not self.eval_due(self.step):
                record({"step": self.step, "epoch": self.epoch_of(self.step), **self.evaluate()})
        self.save(out)
        self.save_checkpoint(store, finished=True)
        return history

    def stop_requested(self, out: Path) -> bool:
        """Whether the command was asked to stop (out/STOP); every rank gets rank 0's answer."""
        flag = [(out / STOP_FILE).exists() if self.rank == 0 else False]
        if self.world > 1:
            torch.distributed.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    def eval_due(self, step: int) -> bool:
        """Whether the loop evaluates after `step`: every train.eval_every steps, else at each epoch's end
        (`fit` also evaluates after the last step)."""
        every = self.cfg.train.eval_every
        return step % (every or self.steps_per_epoch) == 0

    def epoch_of(self, step: int) -> int:
        """The epoch of optimizer step `step` (counted from 1)."""
        return (step - 1) // self.steps_per_epoch

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
        out.update(self.params)
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
        with self.progress.task(f"{self.kind}: evaluate", -(-len(mine) // micro)) as bar:
            for start in range(0, len(mine), micro):
                _, metrics = self.loss_sums(mine[start : start + micro])
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                bar.advance()
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
        """The trained model in HF format (with the tokenizer) at `out`, written by rank 0. With
        model.lora: the PEFT adapter at `out` and the merged model in `out`/merged."""
        if self.lora:
            from keel.models.lora import save_adapter_and_merged

            if self.rank == 0:
                save_adapter_and_merged(self.engine.module, out, self.tokenizer)
            return
        state = full_state_dict(self.engine)  # a collective under ZeRO-3
        if self.rank == 0:
            self.engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, store: CheckpointStore, finished: bool = False) -> Path | None:
        """Commit a checkpoint of the steps done; a collective (every rank calls it). Returns its path
        on rank 0.

        Rank 0 stages the directory and sends the other ranks its path; each rank saves into it its
        DeepSpeed state (engine/, ZeRO shards per rank) and RNG states (rng-rank<r>.pt), and with
        checkpoint.save_hf the model goes to hf/; rank 0 commits once every rank is done. The
        finished run's checkpoint holds only its state.
        """
        state = {
            "step": self.step,
            "epoch": self.epoch_of(self.step),  # of the last step done; the next batch follows from step
            "finished": finished,
            "data": self.data_digest,
            "config": self.cfg.model_dump(mode="json"),
        }
        if finished:
            return store.commit(store.stage(self.step), self.step, state) if self.rank == 0 else None
        where = [str(store.stage(self.step)) if self.rank == 0 else None]
        if self.world > 1:
            torch.distributed.broadcast_object_list(where, src=0)
        staged = Path(where[0])
        save_engine(self.engine, staged / "engine")
        torch.save(rng_state(), staged / f"rng-rank{self.rank}.pt")
        if self.cfg.checkpoint.save_hf:
            self.save(staged / "hf")
        if self.world > 1:
            torch.distributed.barrier()
        return store.commit(staged, self.step, state) if self.rank == 0 else None

    def load_checkpoint(self, path: Path) -> None:
        """Restore what `save_checkpoint` wrote at `path` (a collective): DeepSpeed state, RNG states, step."""
        state = CheckpointStore.read_state(path)
        if state["data"] != self.data_digest:
            raise DataError(
                f"{self.cfg.data.path}: the training rows differ from those of the checkpoint {path}, so the run "
                "cannot continue exactly (--force-new starts over)"
            )
        load_engine(self.engine, path / "engine")
        set_rng_state(torch.load(path / f"rng-rank{self.rank}.pt", weights_only=False))
        self.step = state["step"]


def rows_digest(rows: list[Row]) -> str:
    """sha256 of the rows' fields, in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row.fields, sort_keys=True, default=str).encode() + b"\n")
    return digest.hexdigest()


def output_dir(cfg: OfflineRun, override: str | None = None) -> Path:
    return Path(override or cfg.output_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


@dataclass(frozen=True)
class Start:
    """Where a run in an output directory begins (`open_run`)."""

    checkpoint: Path | None = None  # resume from it; None: from the first step
    step: int = 0  # optimizer steps already done
    finished: bool = False  # the run there already finished: nothing to train
    replaced: Path | None = None  # where a previous run's files went (a fresh start over one)
    history: list[dict] = field(default_factory=list)  # its metrics.jsonl, up to the checkpoint


def open_run(cfg: OfflineRun, out: Path, force_new: bool = False) -> Start:
    """Prepare `out` for a run of `cfg`, in the driver before any rank starts (the counterpart of
    `resume_point` for `keel train`).

    With checkpoint.resume on and no `force_new`, a run resumes from the latest checkpoint in `out`
    when it was made with the same config (`config_differences`), and metrics.jsonl is cut back to
    its step; a finished one is left as it is. Otherwise the run starts afresh, and a previous run's
    checkpoints/, metrics.jsonl and keel_config.yaml are moved into out/replaced-<time>/, never
    deleted. Raises ResumeRefused, naming the fields, when the configs differ; CheckpointError when
    the checkpoint cannot be read.
    """
    out = Path(out)
    (out / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier process
    latest, state, replaced = resume_point(out, cfg.model_dump(mode="json"), cfg.checkpoint.resume, force_new)
    if state is not None:
        if not state["finished"]:
            cut_metrics(out / "metrics.jsonl", lambda m: m.get("step", 0) <= state["step"])
        start = Start(latest, state["step"], state["finished"], history=_metrics(out))
    else:
        start = Start(replaced=replaced)
    if not start.finished:
        out.mkdir(parents=True, exist_ok=True)
        (out / "keel_config.yaml").write_text(dump_config(cfg))
    return start


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_offline(
    trainer_cls: type[OfflineTrainer],
    cfg: OfflineRun,
    out: Path,
    log: Callable[[dict], None] | None = None,
    start: Start | None = None,
    progress=NO_PROGRESS,
) -> tuple[list[dict], list[str]]:
    """Train with `trainer.replicas` ranks: in this process for one, as Ray actors for more, from
    `start` (default `open_run(cfg, out)`: resume what `out` holds; a finished run trains nothing).
    `progress` (keel.telemetry.console) shows the long operations of a rank in this process.

    Returns (rank 0's metric history of the whole run, its data notes)."""
    start = open_run(cfg, out) if start is None else start
    if start.finished:
        return start.history, []
    resume = None if start.checkpoint is None else str(start.checkpoint)
    if cfg.trainer.replicas == 1:
        import torch.distributed

        from keel.controller.actors import free_port

        if not torch.distributed.is_initialized():
            # a process group of one on a free port: a MASTER_PORT inherited from a parent (which may
            # be holding that port itself) must not be reused
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
            os.environ.update({**env, "LOCAL_RANK": "0"})
        trainer = trainer_cls(cfg, progress)
        if log:
            for line in trainer.notes:
                log({"note": line})
        return start.history + trainer.fit(out, log, resume), trainer.notes
    history, notes = _run_on_ray(trainer_cls, cfg, out, resume)
    return start.history + history, notes


def _run_on_ray(
    trainer_cls: type[OfflineTrainer], cfg: OfflineRun, out: Path, resume: str | None
) -> tuple[list[dict], list[str]]:
    import ray

    from keel.controller.actors import free_port, remote
    from keel.controller.placement import RoleRequest, in_group, place_roles
    from keel.controller.supervisor import gather

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
        # a whole training run: no deadline of its own; a lost rank is reported at once, and the
        # survivors' collectives fail after deepspeed.timeout_s
        calls = [(f"trainer rank {i}", r.fit.remote(str(out), resume)) for i, r in enumerate(ranks)]
        results = gather(calls, "training", None, None, "")
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

    def fit(self, out: str, resume: str | None) -> tuple[list[dict], list[str]]:
        return self.trainer.fit(out, resume=resume), self.trainer.notes
