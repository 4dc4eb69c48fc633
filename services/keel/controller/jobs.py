"""A Keel run as a job on a Ray cluster, through the Ray Jobs API (the dashboard address, port 8265).

`submit` validates the config here first (a bad config sends nothing). It uploads the working
directory, leaving out .venv, runs/, .git and caches, and starts `keel train` on the cluster
under a submission id that names the run: `keel-<name>-<time>-<4 hex>`. The id also goes to the
job as KEEL_JOB_ID, which names the job's control actor, so `scale` can find the running
controller. `scale` submits a small control job that leaves the request with that actor and
waits until the controller reports it applied; `live_status` one that reads the status summary the
controller reports there after every step.

The cluster runs the `keel` on its own PATH: put the environment's bin directory there (in the
image, or before `ray start`).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import time
from pathlib import Path

DEFAULT_EXCLUDES = [".venv", "runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RuntimeError):
    """A job request that cannot be made or did not succeed; the text says which job and why."""


def ray_token() -> str | None:
    """The cluster's auth token, where Ray keeps it: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or
    ~/.ray/auth_token. Ray's job client sends it only when token auth is on in *this* process's
    settings, while a `ray start` cluster turns it on whenever the token file exists."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def client(address: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    token = ray_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise JobError(f"the Ray cluster at {address} refused the token: {str(err).splitlines()[0]}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {err}") from None


def _runtime_env(path: str | None) -> dict:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise JobError(f"--runtime-env {path}: {err}") from None
    if not isinstance(data, dict):
        raise JobError(f"--runtime-env {path}: expected a mapping (working_dir, env_vars, pip, ...)")
    return data


def new_job_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
    return f"keel-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    address: str | None,
    config_path: str,
    working_dir: str | None = None,
    runtime_env_file: str | None = None,
    run_dir: str | None = None,
) -> str:
    """Start `keel train --config` on the cluster; returns the job id. Raises ConfigError for a bad
    config and JobError for a bad request, before anything is sent."""
    from keel.config import load_config

    cfg = load_config(config_path)
    runtime_env = _runtime_env(runtime_env_file)
    config_arg = config_path
    if working_dir is not None:
        root, config_file = Path(working_dir).resolve(), Path(config_path).resolve()
        if not root.is_dir():
            raise JobError(f"--working-dir {working_dir} is not a directory")
        if not config_file.is_relative_to(root):
            raise JobError(
                f"--config {config_path} is outside --working-dir {working_dir}: the job sees only that directory"
            )
        config_arg = str(config_file.relative_to(root))
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = DEFAULT_EXCLUDES + list(runtime_env.get("excludes", []))
    job_id = new_job_id(cfg.name)
    # `keel stop` (the Jobs API's stop) sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by
    # default): give the run its grace period to finish the step and write a checkpoint
    grace = {"RAY_JOB_STOP_WAIT_TIME_S": str(int(cfg.checkpoint.stop_grace_s) + 30)}
    runtime_env["env_vars"] = {**grace, **runtime_env.get("env_vars", {}), "KEEL_JOB_ID": job_id}
    entrypoint = f"keel train --config {shlex.quote(config_arg)}"
    if run_dir:
        entrypoint += f" --run-dir {shlex.quote(run_dir)}"
    jobs = client(address)
    jobs.submit_job(
        entrypoint=entrypoint,
        submission_id=job_id,
        runtime_env=runtime_env,
        metadata={"keel": "train", "config": config_arg, "name": cfg.name},
    )
    return job_id


def status(address: str | None, job_id: str) -> dict:
    info = _info(client(address), job_id)
    return {
        "job": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def _info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            raise JobError(f"no job {job_id!r} on this cluster") from None
        raise JobError(f"job {job_id}: {err}") from None


def wait(address: str | None, job_id: str, timeout_s: float, until=TERMINAL) -> str:
    """Poll until the job's status is one of `until`; returns it (JobError on a timeout)."""
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(_info(jobs, job_id).status.value)
        if state in until:
            return state
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} is still {state} after {timeout_s:.0f}s")
        time.sleep(0.5)


def stop(address: str | None, job_id: str, timeout_s: float = 60.0) -> str:
    """Stop the job (its actors go with it); returns its final status."""
    jobs = client(address)
    state = str(_info(jobs, job_id).status.value)
    if state in TERMINAL:
        return state
    jobs.stop_job(job_id)
    return wait(address, job_id, timeout_s)


def logs(address: str | None, job_id: str) -> str:
    jobs = client(address)
    _info(jobs, job_id)
    return jobs.get_job_logs(job_id)


def follow(address: str | None, job_id: str, out) -> str:
    """Write the job's log to `out` as it grows, until the job ends; returns its final status."""
    import asyncio

    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(address, job_id, 60.0)


def live_status(address: str | None, job_id: str, timeout_s: float = 120.0) -> dict:
    """A running job's state and status summary, from its control actor (through a control job, as
    `scale` does): {"state": ..., "summary": ...}. Raises JobError when they cannot be read."""
    import json

    jobs = client(address)
    control_id = f"{job_id}-status-{secrets.token_hex(2)}"
    entrypoint = f"keel _control status --job {shlex.quote(job_id)}"
    jobs.submit_job(entrypoint=entrypoint, submission_id=control_id, metadata={"keel": "control", "job": job_id})
    final = wait(address, control_id, timeout_s)
    text = jobs.get_job_logs(control_id)
    lines = [line for line in text.splitlines() if line.strip()]
    if final != "SUCCEEDED":
        raise JobError(f"reading job {job_id}'s status failed: {(lines or [final])[-1]}")
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


def scale(address: str | None, job_id: str, replicas: int, timeout_s: float = 300.0) -> str:
    """Ask job `job_id` for `replicas` rollout workers (through a control job); returns the control
    job's log. Raises JobError when the job is not running or the scale could not be applied."""
    if replicas < 1:
        raise JobError(f"rollout replicas must be >= 1, got {replicas}")
    jobs = client(address)
    state = str(_info(jobs, job_id).status.value)
    if state != "RUNNING":
        raise JobError(f"job {job_id} is {state}, not RUNNING")
    control_id = f"{job_id}-scale-{secrets.token_hex(2)}"
    entrypoint = f"keel _control scale --job {shlex.quote(job_id)} --rollout {replicas} --timeout {timeout_s:g}"
    jobs.submit_job(entrypoint=entrypoint, submission_id=control_id, metadata={"keel": "control", "job": job_id})
    final = wait(address, control_id, timeout_s + 60)
    text = jobs.get_job_logs(control_id)
    if final != "SUCCEEDED":
        last = [line for line in text.splitlines() if line.strip()][-1:] or [final]
        raise JobError(f"scaling job {job_id} to {replicas} rollout workers failed: {last[0]}")
    return text
