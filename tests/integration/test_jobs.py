"""`keel submit / status / logs / scale / stop` against a real Ray cluster started here with
`ray start --head` (and stopped after), not against a Ray inside the test process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from keel.controller.actors import free_port

BIN = Path(sys.executable).parent
KEEL = shutil.which("keel", path=str(BIN)) or "keel"


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray head with the dashboard (Jobs API); `keel` from this environment on its PATH."""
    base = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard, client_port, agent = (free_port() for _ in range(4))
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
        "--port", str(port), "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent),
        "--temp-dir", str(base / "ray"),
    ]  # fmt: skip
    log = open(base / "ray-start.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # up when the Jobs API answers (an unknown job: exit 1)
        probe = keel("status", "probe", "--address", address, env=env)
        if "no job 'probe'" in probe.stderr:
            break
        assert proc.poll() is None, (base / "ray-start.log").read_text()[-2000:]
        time.sleep(1)
    else:
        pytest.fail(f"Ray Jobs API at {address} did not come up: {(base / 'ray-start.log').read_text()[-2000:]}")
    yield address, env
    proc.terminate()  # `ray start --block` takes the cluster's processes down with it
    proc.wait(timeout=60)
    log.close()
    shutil.rmtree(base, ignore_errors=True)


def keel(*args, env=None, timeout=600):
    return subprocess.run([KEEL, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _run_config(demo_inputs, directory: Path, steps: int) -> Path:
    policy, prompts = demo_inputs
    config = {
        "name": "jobtest",
        "model": {"policy": str(policy), "max_prompt_tokens": 16},
        "data": {"prompts": str(prompts), "metadata_fields": ["answer"]},
        "rollout": {"backend": "hf", "resources": {"num_cpus": 0.25}, "sampling": {"max_new_tokens": 4}},
        "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
        "reference": {"resources": {"num_cpus": 0.25}},
        "learner": {"resources": {"num_cpus": 0.5}, "micro_batch_size": 16},
        "algorithm": {"mini_batch_size": 16},
        "controller": {"steps": steps, "prompts_per_step": 16},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_submit_follow_and_status(cluster, demo_inputs, tmp_path):
    address, env = cluster
    config = _run_config(demo_inputs, tmp_path / "job", steps=3)
    out = keel("submit", "--address", address, "--config", str(config), "--working-dir", str(tmp_path / "job"),
               "--run-dir", str(tmp_path / "run"), "--follow", env=env)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = out.stdout.splitlines()[0].removeprefix("submitted ")
    assert job.startswith("keel-jobtest-")
    assert "step    3/3" in out.stdout and f"job {job}: SUCCEEDED" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "final" / "model.safetensors").exists()  # a path on the (local) cluster
    status = keel("status", job, "--address", address, env=env)
    assert status.returncode == 0 and status.stdout.startswith(f"{job}: SUCCEEDED")


def test_scale_a_running_job_then_stop_it(cluster, demo_inputs, tmp_path):
    address, env = cluster
    config = _run_config(demo_inputs, tmp_path / "job", steps=5000)
    out = keel("submit", "--address", address, "--config", str(config), "--working-dir", str(tmp_path / "job"), env=env)
    assert out.returncode == 0, out.stderr
    job = out.stdout.splitlines()[0].removeprefix("submitted ")
    try:
        deadline = time.monotonic() + 240
        while "step " not in keel("logs", job, "--address", address, env=env).stdout:
            assert time.monotonic() < deadline, keel("logs", job, "--address", address, env=env).stdout[-3000:]
            time.sleep(2)
        scaled = keel("scale", "rollout", "2", "--job", job, "--address", address, env=env)
        assert scaled.returncode == 0, scaled.stdout[-2000:] + scaled.stderr[-2000:]
        assert f"job {job}: 2 rollout workers" in scaled.stdout
        assert "rollout workers: 1 -> 2" in keel("logs", job, "--address", address, env=env).stdout
        # keel status JOB: the run's own status, from its controller: both workers, each with its weight version
        deadline = time.monotonic() + 120
        while "rollout  2 workers" not in (live := keel("status", job, "--address", address, env=env)).stdout:
            assert time.monotonic() < deadline, live.stdout[-2000:] + live.stderr[-2000:]
            time.sleep(2)
        lines = live.stdout.splitlines()
        assert lines[0].startswith(f"{job}: RUNNING") and lines[1].startswith("jobtest: running, step "), live.stdout
        assert re.search(r"rollout  2 workers: rollout-0 v(\d+), rollout-1 v\1\n", live.stdout), live.stdout
        # a request the job refuses comes back as an error, and the job keeps running
        refused = keel("scale", "rollout", "40", "--job", job, "--address", address, "--timeout", "60", env=env)
        assert refused.returncode == 1 and "rollout workers must be in [1, 16], got 40" in refused.stderr
        assert keel("status", job, "--address", address, env=env).stdout.startswith(f"{job}: RUNNING")
    finally:
        stopped = keel("stop", job, "--address", address, env=env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job}: STOPPED"
    assert keel("status", job, "--address", address, env=env).stdout.startswith(f"{job}: STOPPED")


def test_a_stopped_job_submitted_again_resumes(cluster, demo_inputs, tmp_path):
    """`keel stop` gives the job its grace period: it finishes the step and checkpoints into the run
    directory; the same submission again continues from there and trains every step exactly once."""
    import json

    address, env = cluster
    steps = 200  # about 0.1 s each here: long enough to be stopped mid-run
    config = _run_config(demo_inputs, tmp_path / "job", steps=steps)
    run_dir = str(tmp_path / "run")
    submit = ("submit", "--address", address, "--config", str(config), "--working-dir", str(tmp_path / "job"),
              "--run-dir", run_dir)  # fmt: skip
    out = keel(*submit, env=env)
    assert out.returncode == 0, out.stderr
    job = out.stdout.splitlines()[0].removeprefix("submitted ")
    deadline = time.monotonic() + 240
    while f"step    2/{steps}" not in keel("logs", job, "--address", address, env=env).stdout:
        assert time.monotonic() < deadline, keel("logs", job, "--address", address, env=env).stdout[-3000:]
        time.sleep(1)
    stopped = keel("stop", job, "--address", address, env=env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job}: STOPPED", stopped.stderr
    logs = keel("logs", job, "--address", address, env=env).stdout
    assert "SIGTERM: finishing this step" in logs, logs[-3000:]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tmp_path / "run" / "checkpoints" / latest / "state.json").read_text())
    assert 2 <= state["step"] < steps and not state["finished"]

    again = keel(*submit, "--follow", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"at step {state['step']} of {steps}" in again.stdout and "SUCCEEDED" in again.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(steps))


def test_bad_requests_send_nothing(cluster, tmp_path):
    address, env = cluster
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {policy: p}\n")
    out = keel("submit", "--address", address, "--config", str(bad), env=env)
    assert out.returncode == 2 and "config error" in out.stderr and "data: required field missing" in out.stderr
    (tmp_path / "wd").mkdir()
    good = _run_config(((tmp_path / "p"), (tmp_path / "x")), tmp_path / "elsewhere", steps=1)
    out = keel("submit", "--address", address, "--config", str(good), "--working-dir", str(tmp_path / "wd"), env=env)
    assert out.returncode == 2 and "is outside --working-dir" in out.stderr
    out = keel("stop", "keel-nope", "--address", address, env=env)
    assert out.returncode == 1 and out.stderr.strip() == "keel: no job 'keel-nope' on this cluster"
    out = keel("status", "x", env={k: v for k, v in env.items() if k != "RAY_ADDRESS"})
    assert out.returncode == 1 and "no cluster address" in out.stderr
