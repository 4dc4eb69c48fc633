"""`keel status RUN_DIR` on run directories in each state a run leaves behind: running (metrics
just written), stopped with a checkpoint, failed with an error, finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from keel.controller.checkpoint import CheckpointStore
from keel.telemetry.status import format_status, record_error, run_status


def _run(tmp_path, steps_done: int, total: int = 10, checkpoint: int | None = None, finished: bool = False):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "demo-ppo", "controller": {"steps": total}}))
    lines = []
    for s in range(steps_done):
        lines.append(
            {
                "step": s,
                "reward_mean": 0.1 + 0.02 * s,
                "kl": 0.001 * s,
                "response_length": 3.0,
                "samples_per_s": 20.0,
                "step_time": 2.0,
                "rollout/workers": 2.0,
                "rollout/restarts": 1.0 if s >= 2 else 0.0,
                "rollout/weight_versions": {"rollout-0": s + 1, "rollout-2" if s >= 2 else "rollout-1": s + 1},
                **({"errors/rollout/lost": 1.0, "errors/reward/unavailable": 3.0} if s >= 2 else {}),
            }
        )
    lines.append({"step": steps_done, "eval/reward_mean": 0.3, "eval/task_metric": 0.25})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if checkpoint is not None:
        store = CheckpointStore(run / "checkpoints", 2)
        store.commit(store.stage(checkpoint), checkpoint, {"step": checkpoint, "finished": finished})
    return run


def test_a_running_run_shows_progress_trend_speed_and_eta(tmp_path):
    info = run_status(_run(tmp_path, 4, checkpoint=2))
    assert info["state"] == "running" and info["done"] == 4 and info["eta_s"] == 6 * 2.0
    text = format_status(info)
    assert text.splitlines()[0] == "demo-ppo: running, step 4/10 (40%), ETA 12s"
    assert "reward   +0.160  (+0.060 over the last 3 steps)    kl 0.0030    length 3.0" in text
    assert "  speed    20.0 samples/s, 2.0 s/step\n" in text
    assert "  rollout  2 workers (1 replaced): rollout-0 v4, rollout-2 v4\n" in text
    assert "  errors   rollout lost 1, reward unavailable 3\n" in text
    assert "eval     after step 4: reward +0.300  task 0.250" in text
    assert "checkpoint step-000002 (" in text and "  error " not in text


def test_a_stopped_run_and_a_failed_one(tmp_path):
    run = _run(tmp_path, 4, checkpoint=4)
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    assert run_status(run)["state"].startswith("stopped")
    record_error(run, "error: learner rank 1: lost during update at step 4 (ActorDiedError)")
    info = run_status(run)
    assert info["state"] == "failed"
    assert format_status(info).splitlines()[-1] == (
        "  error    error: learner rank 1: lost during update at step 4 (ActorDiedError)"
    )


def test_the_command_for_a_finished_run_and_for_no_run(tmp_path):
    run = _run(tmp_path, 10, checkpoint=10, finished=True)
    keel = [sys.executable, "-m", "keel.cli"]
    done = subprocess.run([*keel, "status", str(run), "--watch", "0.1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "demo-ppo: finished, step 10/10 (100%)"
    assert "checkpoint step-000010, final" in done.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run([*keel, "status", str(empty)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no keel train run here" in bad.stderr


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (125, "2m05s"), (7300, "2h01m")])
def test_durations(seconds, text):
    from keel.telemetry.status import _duration

    assert _duration(seconds) == text
