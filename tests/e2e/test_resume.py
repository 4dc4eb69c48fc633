"""Exact resume through the `keel train` command, as a user meets it: N steps straight, against
N/2 steps, a kill -9 of the driver's whole process group (its local Ray with it), and the same
command again. Sync mode, HF rollout, fixed seeds, PPO with a critic (GAE): the per-step metrics
and the final weights are equal bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KEEL = [sys.executable, "-m", "keel.cli"]
STEPS = 6
# wall-clock figures differ between any two runs; everything else must not
NOT_COMPARED = ("time/", "anatomy/", "step_time", "samples_per_s", "rollout/wait_s", "eval/time_s")


def _config(tmp_path: Path, policy, prompts, **overrides) -> Path:
    data = yaml.safe_load((ROOT / "deploy" / "configs" / "demo.yaml").read_text())
    data["model"]["policy"], data["data"]["prompts"] = str(policy), str(prompts)
    data["rollout"]["backend"] = "hf"
    data["controller"].update(steps=STEPS, prompts_per_step=32)
    data["algorithm"]["mini_batch_size"] = 16
    data["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(config: Path, run_dir: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*KEEL, "train", "--config", str(config), "--run-dir", str(run_dir), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_ADDRESS": ""},  # a local Ray of its own, as on a laptop
        cwd=ROOT,
    )


def _kill_after_checkpoint(config: Path, run_dir: Path, step: int) -> None:
    """Start `keel train`, and kill -9 its whole process group once the checkpoint of `step` is complete."""
    proc = subprocess.Popen(
        [*KEEL, "train", "--config", str(config), "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
        cwd=ROOT,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    try:
        while not (latest.exists() and latest.read_text().strip() == f"step-{step:06d}"):
            assert proc.poll() is None, "keel train ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith(NOT_COMPARED)} for m in lines]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(demo_inputs, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with: (its config, its run directory)."""
    base = tmp_path_factory.mktemp("resume")
    config = _config(base, *demo_inputs)
    done = _train(config, base / "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    # keel train leaves the run's curves beside its metrics
    assert (base / "straight" / "plots" / "reward.png").read_bytes()[:4] == b"\x89PNG"
    return config, base / "straight"


def _same_run(a: Path, b: Path) -> None:
    import torch

    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in mb] == list(range(STEPS))  # no step twice, none missing
    assert ma == mb
    wa, wb = _weights(a / "checkpoints" / "final"), _weights(b / "checkpoints" / "final")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_killed_run_resumes_exactly(straight, demo_inputs, tmp_path):
    config, straight = straight
    killed = tmp_path / "killed"

    _kill_after_checkpoint(config, killed, 2)
    state = json.loads((killed / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2 and not state["finished"]
    resumed = _train(config, killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 2" in resumed.stdout, resumed.stdout

    _same_run(straight, killed)

    # the finished run, run again, says so and trains nothing
    again = _train(config, killed)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    assert len(_metrics(killed)) == STEPS

    # another config in the same directory is refused, naming the fields
    other = _config(tmp_path, *demo_inputs, **{"algorithm.kl.coef": 0.02, "seed": 3})
    refused = _train(other, killed, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "algorithm.kl.coef: 0.01 -> 0.02" in refused.stderr and "seed: 0 -> 3" in refused.stderr


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(straight, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, metrics.jsonl ends in a whole
    line, the exit code says "stopped"; the same command then finishes the run exactly."""
    config, straight = straight
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        [*KEEL, "train", "--config", str(config), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        cwd=ROOT,
        start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "keel train ended or stalled"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM: finishing this step" in err
    text = metrics.read_text()
    assert text.endswith("\n")
    done = len(text.splitlines())
    assert 1 <= done < STEPS
    state = json.loads((run_dir / "checkpoints" / f"step-{done:06d}" / "state.json").read_text())
    assert state["step"] == done and not state["finished"]
    resumed = _train(config, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(straight, run_dir)
