"""The checkpoint store: atomic saves, a `latest` that always names a complete checkpoint, pruning
that never removes the one to resume from, and leftovers of a crash that break nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from keel.controller.checkpoint import STATE_FILE, CheckpointStore, checkpoint_name, cut_metrics


def _save(store: CheckpointStore, step: int, payload: bytes = b"x") -> None:
    staged = store.stage(step)
    (staged / "weights.bin").write_bytes(payload)
    store.commit(staged, step, {"step": step, "sha": hashlib.sha256(payload).hexdigest()})


def test_save_prune_and_latest(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=2)
    assert store.latest() is None and store.complete() == []
    for step in (2, 4, 6):
        _save(store, step)
    assert [p.name for p in store.complete()] == [checkpoint_name(4), checkpoint_name(6)]
    assert store.latest().name == checkpoint_name(6)
    assert store.read_state(store.latest())["step"] == 6
    _save(store, 6, b"again")  # the same step saved twice replaces it
    assert (store.latest() / "weights.bin").read_bytes() == b"again"
    assert [p.name for p in store.complete()] == [checkpoint_name(4), checkpoint_name(6)]


def test_leftovers_of_a_crash_break_nothing(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=1)
    _save(store, 2)
    # a save killed before its rename; a directory with the final name but no state (a copy cut
    # short); a pointer at a checkpoint that is not there
    store.stage(4)
    (store.root / checkpoint_name(8)).mkdir()
    (store.root / checkpoint_name(8) / "weights.bin").write_bytes(b"partial")
    assert store.latest().name == checkpoint_name(2)
    (store.root / "latest").write_text(checkpoint_name(9) + "\n")
    assert store.latest().name == checkpoint_name(2)  # the newest complete one
    _save(store, 3)
    assert [p.name for p in store.complete()] == [checkpoint_name(3)]
    assert not list(store.root.glob(".staging-*"))
    assert (store.root / checkpoint_name(8)).exists()  # not ours to judge complete: left, never loaded


def test_unreadable_state_names_the_file(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=1)
    _save(store, 1)
    (store.latest() / STATE_FILE).write_text("{torn")
    from keel.controller.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="state.json: cannot read the checkpoint state"):
        store.read_state(store.latest())


WRITER = """
import hashlib, os, sys
from pathlib import Path
from keel.controller.checkpoint import CheckpointStore
store = CheckpointStore(Path(sys.argv[1]), keep_last=2)
step = 0
while True:
    step += 1
    payload = os.urandom(3 << 20)
    staged = store.stage(step)
    for i in range(4):
        (staged / f"part{i}.bin").write_bytes(payload)
    store.commit(staged, step, {"step": step, "sha": hashlib.sha256(payload).hexdigest()})
    print(step, flush=True)
"""


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """A writer saving checkpoints in a loop, killed at random moments: after every kill the store
    resumes from a complete checkpoint whose files match the checksum it recorded."""
    root = tmp_path / "checkpoints"
    rng = random.Random(0)
    seen_steps = []
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint of this writer is complete
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        store = CheckpointStore(root, keep_last=2)
        latest = store.latest()
        assert latest is not None
        state = store.read_state(latest)
        for i in range(4):
            assert hashlib.sha256((latest / f"part{i}.bin").read_bytes()).hexdigest() == state["sha"]
        seen_steps.append(state["step"])
    assert max(seen_steps) >= 1


def test_cut_metrics_keeps_whole_lines_before_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "reward_mean": 0.1 * s}) for s in range(5)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "rew')  # torn by a crash
    dropped = cut_metrics(path, lambda m: m["step"] < 3)
    assert dropped == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert path.read_text().endswith("\n")


def test_a_resume_may_change_the_trackers_and_a_run_saved_before_them_resumes():
    """The trackers are where metrics go, not what a run computes (MAY_DIFFER); an offline run saved
    before its config had a logging section compares that section field by field, as empty."""
    from keel.config import SFTConfig
    from keel.controller.checkpoint import config_differences

    base = {"model": {"path": "m"}, "data": {"path": "d"}}
    saved = SFTConfig.model_validate(base).model_dump(mode="json")
    logging = {"console": "rich", "trackers": ["wandb", "mlflow"], "wandb": {"project": "p"}, "mlflow": {}}
    current = SFTConfig.model_validate({**base, "logging": logging}).model_dump(mode="json")
    assert config_differences(saved, current) == []
    del saved["logging"]
    assert config_differences(saved, current) == []
    saved["train"] = {**saved["train"], "epochs": 2}  # what the run computes still counts
    assert config_differences(saved, current) == ["train.epochs: 2 -> 1"]
