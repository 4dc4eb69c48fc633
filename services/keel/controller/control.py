"""Reaching a running job: its control actor, and what `keel scale` and `keel status JOB` ask it.

Each controller registers a named actor, `keel-control-<job id>`, in the Ray namespace "keel". The
job id is `$KEEL_JOB_ID` (set by `keel submit`) or a local one. `keel scale rollout N --job ID`
submits a small control job through the Ray Jobs API, so it needs only the dashboard address. That
job calls `send_scale`, which leaves the request with the actor and waits until the controller
reports it applied. The controller reads requests between steps (no rollout is in flight then) and
reports its state after each step, with a summary of its metrics (`keel.telemetry.status.summarize`)
that `keel status JOB` reads through a control job of its own (`read_status`).
"""

from __future__ import annotations

import time

NAMESPACE = "keel"


def control_name(job_id: str) -> str:
    return f"keel-control-{job_id}"


class ControlActor:
    """A mailbox between `keel scale` and the controller. Holds no resources (num_cpus=0)."""

    def __init__(self, job_id: str, state: dict):
        self.job_id = job_id
        self.requested: int | None = None
        self.state = state
        self.errors: list[str] = []
        self.summary: dict | None = None  # the run's status summary, after its first step

    def request_rollout(self, replicas: int) -> dict:
        if replicas < 1:
            raise ValueError(f"rollout replicas must be >= 1, got {replicas}")
        self.requested = replicas
        return self.status()

    def take_request(self) -> int | None:
        request, self.requested = self.requested, None
        return request

    def report(self, state: dict, error: str | None = None, summary: dict | None = None) -> None:
        self.state = state
        if error:
            self.errors.append(error)
        if summary is not None:
            self.summary = summary

    def read_summary(self) -> dict | None:
        return self.summary

    def status(self) -> dict:
        return {
            "job": self.job_id,
            "pending": self.requested,
            "error_count": len(self.errors),
            "errors": list(self.errors[-3:]),
            **self.state,
        }


def _control_actor(job_id: str):
    import ray

    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE, log_to_driver=False)
    try:
        return ray.get_actor(control_name(job_id), namespace=NAMESPACE)
    except ValueError:
        raise LookupError(f"no running keel job {job_id!r} on this cluster (no actor {control_name(job_id)})") from None


def read_status(job_id: str, timeout_s: float = 60.0) -> dict:
    """Run inside the cluster (the control job of `keel status JOB`): the job's state and its status
    summary (None before its first step)."""
    import ray

    actor = _control_actor(job_id)
    state, summary = ray.get([actor.status.remote(), actor.read_summary.remote()], timeout=timeout_s)
    return {"state": state, "summary": summary}


def send_scale(job_id: str, replicas: int, timeout_s: float = 300.0) -> dict:
    """Run inside the cluster (the control job): ask job `job_id` for `replicas` rollout workers and
    wait until its controller reports them, or reports why it could not."""
    import ray

    actor = _control_actor(job_id)
    deadline = time.monotonic() + timeout_s
    errors_before = ray.get(actor.status.remote(), timeout=timeout_s)["error_count"]
    ray.get(actor.request_rollout.remote(replicas), timeout=max(1.0, deadline - time.monotonic()))
    while time.monotonic() < deadline:
        status = ray.get(actor.status.remote(), timeout=max(1.0, deadline - time.monotonic()))
        if status["pending"] is None and status.get("rollout_replicas") == replicas:
            return status
        if status["pending"] is None and status["error_count"] > errors_before:
            raise RuntimeError(f"job {job_id} could not scale to {replicas}: {status['errors'][-1]}")
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not apply rollout={replicas} within {timeout_s:.0f}s (is a step running?)")
