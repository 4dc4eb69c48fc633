"""Checkpoints of the offline trainers: a run interrupted and resumed by running the same command
again gives, bit for bit, the metrics and weights of a run that went straight through; a different
config or changed training rows are refused; --force-new moves the old run aside; a finished run
trains nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from keel.cli import EXIT_BAD_INPUT, EXIT_OK, main
from keel.config import SFTConfig
from keel.controller.checkpoint import CheckpointStore
from keel.learner.offline import run_offline
from keel.learner.sft import SFTTrainer
from unit.learner.offline_helpers import sft_data, trainer


def _settings(policy, data, epochs: int = 2) -> dict:
    # 32 rows: 4 held out, 28 to train on in batches of 8, so 3 steps an epoch (an evaluation after each)
    return {
        "model": {"path": str(policy)},
        "data": {"path": str(data), "eval_fraction": 0.125, "max_tokens": 16},
        "trainer": trainer(micro=4),
        "train": {"epochs": epochs, "batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 1},
    }


def _write(path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def _sft(config: str, out, *flags: str) -> int:
    return main(["sft", "--config", config, "--out", str(out), *flags])


def _metrics(out) -> list[dict]:
    """metrics.jsonl without the timings (which no two runs share)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def _files(out) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


class Crash(Exception):
    pass


def test_an_interrupted_sft_run_resumed_equals_a_straight_one(tiny_model_dir, tmp_path, capsys):
    data = sft_data(tmp_path, rows=32)
    config = _write(tmp_path / "sft.yaml", _settings(tiny_model_dir, data))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _sft(config, straight) == EXIT_OK

    # The same run, crashed by its log callback once step 3 is recorded: the checkpoint of step 2 is
    # the latest, and metrics.jsonl holds a step the resumed run must not repeat. (Stopping it with a
    # smaller train.max_steps would not do: that is another config, with another LR schedule.)
    def crash(m: dict) -> None:
        if m.get("step") == 3 and "sft/loss" in m:
            raise Crash

    with pytest.raises(Crash):
        run_offline(SFTTrainer, SFTConfig.model_validate(yaml.safe_load(open(config))), resumed, crash)
    store = CheckpointStore(resumed / "checkpoints", keep_last=1)
    assert [p.name for p in store.complete()] == ["step-000002"]
    assert store.read_state(store.latest())["step"] == 2 and not store.read_state(store.latest())["finished"]
    assert {"engine", "rng-rank0.pt", "hf"} <= {p.name for p in store.latest().iterdir()}
    assert _metrics(resumed)[-1]["step"] == 3

    # changed training rows under the same path: refused, since the batches would not be the same
    saved = data.read_text()
    data.write_text(saved.replace("+", " + ", 1))
    capsys.readouterr()
    assert _sft(config, resumed) == EXIT_BAD_INPUT
    assert "the training rows differ from those of the checkpoint" in capsys.readouterr().err
    data.write_text(saved)

    assert _sft(config, resumed) == EXIT_OK  # the same command again
    assert f"sft: resuming from {store.root / 'step-000002'} (2 steps done)" in capsys.readouterr().out
    assert _metrics(resumed) == _metrics(straight)  # every step's loss, accuracy, grad norm, LR, evaluation
    assert [m["step"] for m in _metrics(resumed) if "eval/sft/loss" in m] == [3, 6]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finished = store.read_state(store.latest())
    assert [p.name for p in store.complete()] == ["step-000006"] and finished["finished"]
    assert finished["epoch"] == 1


def test_finished_refused_and_force_new(tiny_model_dir, tmp_path, capsys):
    settings = _settings(tiny_model_dir, sft_data(tmp_path, rows=32), epochs=1)
    config = _write(tmp_path / "sft.yaml", settings)
    out = tmp_path / "out"
    assert _sft(config, out) == EXIT_OK
    first, files = _metrics(out), _files(out)
    capsys.readouterr()

    # the same command again: the run is finished, nothing is trained or written
    assert _sft(config, out) == EXIT_OK
    assert f"{out}: the run already finished (3 steps); nothing to train" in capsys.readouterr().out
    assert _files(out) == files

    # another learning rate: refused before anything starts, naming the field, on one line
    settings["trainer"]["optimizer"]["lr"] = 2e-3
    other = _write(tmp_path / "other.yaml", settings)
    assert _sft(other, out) == EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"keel: config error: {other}: {out} holds a run made with another config: ")
    assert "trainer.optimizer.lr: 0.001 -> 0.002" in line and line.endswith("(--force-new starts over)")
    assert _files(out) == files

    # --force-new: the old run's checkpoints, metrics (TensorBoard's too) and config moved aside whole; a new
    # run trained
    assert _sft(other, out, "--force-new") == EXIT_OK
    (aside,) = out.glob("replaced-*")
    assert f"are now in {aside}" in capsys.readouterr().out
    old_run = ("checkpoints", "metrics", "keel_config", "tensorboard")
    assert {name: files[name] for name in files if name.startswith(old_run)} == {
        str(p.relative_to(aside)): p.stat().st_mtime_ns for p in sorted(aside.rglob("*")) if p.is_file()
    }
    assert len(list((out / "tensorboard").glob("events.*"))) == 1  # the new run's own
    state = CheckpointStore.read_state(CheckpointStore(out / "checkpoints", 1).latest())
    assert state["finished"] and state["config"]["trainer"]["optimizer"]["lr"] == 2e-3
    second = _metrics(out)
    assert [m["step"] for m in second] == [m["step"] for m in first] == [1, 2, 3, 3]
    assert second[0]["sft/loss"] == first[0]["sft/loss"] and second[1]["sft/loss"] != first[1]["sft/loss"]


def test_two_ranks_on_ray_resume_exactly(tiny_model_dir, ray_session, tmp_path):
    """Each rank saves into the checkpoint rank 0 staged (DeepSpeed state, its own RNG states), and
    the ranks resume from it. The finished run cut back to its checkpoint of step 2 is what a crash
    during step 3 leaves."""
    settings = _settings(tiny_model_dir, sft_data(tmp_path, rows=32))
    settings["trainer"] = trainer(micro=4, replicas=2, resources={"num_cpus": 0.5})
    settings["checkpoint"]["keep_last"] = 3
    cfg = SFTConfig.model_validate(settings)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_offline(SFTTrainer, cfg, straight)
    checkpoint = straight / "checkpoints" / "step-000002"
    assert {"engine", "rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in checkpoint.iterdir()}

    shutil.copytree(straight, resumed)
    for later in ("step-000004", "step-000006"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "checkpoints" / "latest").write_text("step-000002\n")
    (resumed / "model.safetensors").unlink()
    run_offline(SFTTrainer, cfg, resumed)
    assert _metrics(resumed) == _metrics(straight)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_stops_sft_with_a_checkpoint_and_the_same_command_resumes(tiny_model_dir, tmp_path):
    """`keel sft` as a process: SIGTERM after its first step; it checkpoints at the step boundary and
    exits 75; run again, it finishes with the metrics and weights of a run that went straight through."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = sft_data(tmp_path, rows=32)
    settings = _settings(tiny_model_dir, data)
    settings["checkpoint"]["every_steps"] = 0  # the stop alone writes the checkpoint
    config = _write(tmp_path / "sft.yaml", settings)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _sft(config, straight) == EXIT_OK
    command = [sys.executable, "-m", "keel.cli", "sft", "--config", config, "--out", str(stopped)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM: finishing this step" in err and "stopped with a checkpoint" in out
    state = CheckpointStore.read_state(CheckpointStore(stopped / "checkpoints", 1).latest())
    assert 1 <= state["step"] < 6 and not state["finished"]
    assert not (stopped / "STOP").exists()
    assert _sft(config, stopped) == EXIT_OK
    assert _metrics(stopped) == _metrics(straight)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(stopped / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
