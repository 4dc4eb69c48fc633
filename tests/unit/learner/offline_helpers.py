"""Shared setup of the offline-trainer tests: tiny task data and configs."""

from __future__ import annotations

from pathlib import Path

from keel.data.tasks import arithmetic_preference_rows, arithmetic_sft_rows, write_jsonl


def sft_data(base: Path, rows: int = 256) -> Path:
    return write_jsonl(arithmetic_sft_rows(rows, seed=1), base / "sft.jsonl")


def pair_data(base: Path, rows: int = 1200, held_out: int = 200) -> tuple[Path, Path]:
    train = write_jsonl(arithmetic_preference_rows(rows, seed=2), base / "pairs.jsonl")
    held = write_jsonl(arithmetic_preference_rows(held_out, seed=3), base / "pairs_eval.jsonl")
    return train, held


def trainer(micro: int = 16, lr: float = 1e-3, replicas: int = 1, **extra) -> dict:
    opt = {"lr": lr, "warmup_steps": 5, "schedule": "cosine", "min_lr_ratio": 0.1}
    return {"micro_batch_size": micro, "replicas": replicas, "optimizer": opt, **extra}
