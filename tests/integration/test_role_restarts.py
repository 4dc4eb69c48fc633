"""Roles other than the rollout workers, lost or hung, on real Ray actors and real gRPC servers:

- a reference actor SIGKILLed by the OS in the middle of its call, and a reward actor whose call
  hangs: Ray starts each again, the call is sent again, the step completes
  (`reference/restarts`, `reward/restarts`);
- an external reward server that stays away past reward.outage_budget_s: the run stops at the
  step boundary with a checkpoint and an error naming the reward, and resumes from it (one that
  comes back within the budget is ridden out: tests/integration/test_chaos.py);
- a learner rank SIGKILLed mid-run with checkpoint.every_steps 1 and controller.max_restarts 1:
  every role starts again from the latest checkpoint and the metrics continue from its step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from integration.configs import demo_config

SMALL = {"num_cpus": 0.25}


def _config(demo_inputs, **extra):
    return demo_config(
        *demo_inputs,
        **{
            "rollout.resources": SMALL,
            "controller.steps": 4,
            "controller.prompts_per_step": 16,
            "algorithm.mini_batch_size": 16,
            **extra,
        },
    )


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _slow_down(actor, owner: str, method: str, seconds: float, marker: Path | None = None) -> None:
    """From now on, the actor's `self.<owner>.<method>` (`self.<method>` with no owner) touches
    `marker` (when given), then sleeps `seconds` before it runs. Gone once Ray starts the actor
    again: a new process runs the constructor. The reference's `model.forward`: its call is in
    progress; a learner rank's `policy.backward`: its peers wait for it in the gradient all-reduce."""
    import ray

    def patch(self, owner, method, seconds, marker):
        target = getattr(self, owner) if owner else self
        original = getattr(target, method)

        def slow(*args, **kwargs):
            if marker:
                Path(marker).touch()
            time.sleep(seconds)
            return original(*args, **kwargs)

        setattr(target, method, slow)

    ray.get(actor.__ray_call__.remote(patch, owner, method, seconds, str(marker) if marker else None), timeout=60)


def _kill_when(marker: Path, pid: int, killed: list) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_reference_killed_mid_call_and_reward_hung_are_started_again(demo_inputs, ray_session, tmp_path):
    from keel.controller.loop import Controller

    cfg = _config(demo_inputs, **{"controller.score_timeout_s": 8.0})
    controller = Controller(cfg, tmp_path / "run", log=print)
    killed, marker = [], tmp_path / "reference-called"

    def hook(m):
        sup = controller.supervisor
        if m["step"] == 0:  # step 1: the reference is killed by the OS while it computes
            reference = sup.reference.actors[0]
            _slow_down(reference, "model", "forward", 5.0, marker)
            _kill_when(marker, _pid(reference), killed)
        if m["step"] == 1:  # step 2: the reward actor hangs
            _slow_down(sup.reward.actors[0], "", "score_sources", 3600.0)  # hangs

    controller.start()
    try:
        history = controller.run(on_step=hook)
    finally:
        controller.shutdown()
    steps = [m for m in history if "reward_mean" in m]
    print("score phase per step (s):", [round(m["time/score"], 1) for m in steps])
    assert killed and [m["step"] for m in steps] == [0, 1, 2, 3]
    assert [m["reference/restarts"] for m in steps] == [0.0, 1.0, 1.0, 1.0]
    assert [m["reward/restarts"] for m in steps] == [0.0, 0.0, 1.0, 1.0]
    # the errors by role and kind: one reference lost in step 1, one reward call past its deadline in step 2
    assert [m.get("errors/reference/lost", 0.0) for m in steps] == [0.0, 1.0, 1.0, 1.0]
    assert [m.get("errors/reward/timeout", 0.0) for m in steps] == [0.0, 0.0, 1.0, 1.0]
    # the hang was noticed at the deadline, not an hour later
    assert 8.0 <= steps[2]["time/score"] < 8.0 + 90.0, steps[2]["time/score"]
    # nothing went missing: every sample of every step has a reference log-prob and a score
    assert all(m["kl"] == m["kl"] and m["reward_mean"] == m["reward_mean"] for m in steps)


def _reward_server(cfg, port: int = 0):
    from keel.config import GrpcConfig
    from keel.reward.server import RewardServerConfig, start_reward_server

    return start_reward_server(RewardServerConfig(reward=cfg.reward, grpc=GrpcConfig(auth=False), port=port))


def _external_reward(demo_inputs, port: int, **extra):
    return _config(
        demo_inputs,
        **{
            "transport.reward": "grpc",
            "transport.grpc.auth": False,
            "transport.grpc.reward_address": f"127.0.0.1:{port}",
            "transport.grpc.retries": 2,
            **extra,
        },
    )


def test_an_outage_past_the_budget_stops_at_the_step_boundary_with_a_checkpoint(demo_inputs, ray_session, tmp_path):
    from keel.controller.checkpoint import CheckpointStore
    from keel.controller.loop import Controller
    from keel.controller.supervisor import RoleOutage

    server = _reward_server(_config(demo_inputs))
    port = server.port
    cfg = _external_reward(demo_inputs, port, **{"reward.outage_budget_s": 3.0})
    run_dir = tmp_path / "run"
    controller = Controller(cfg, run_dir, log=print)

    def hook(m):
        if m["step"] == 1:
            server.stop(0)

    controller.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RoleOutage, match=r"reward: server 127\.0\.0\.1:\d+ unreachable .*outage_budget_s \(3s\)"):
            controller.run(on_step=hook)
        waited = time.monotonic() - t0
        print(f"reward outage: stopped with a checkpoint {waited:.1f}s after the run started")
        prompts_trained = [p for step in controller.prompt_log for p in step]
    finally:
        controller.shutdown()
    latest = CheckpointStore(run_dir / "checkpoints", 1).latest()
    state = CheckpointStore.read_state(latest)
    assert state["step"] == 2 and not state["finished"] and waited < 120
    assert [m["step"] for m in _lines(run_dir)] == [0, 1]

    # the server is back: the run resumes from the boundary and trains every prompt once
    server = _reward_server(cfg, port)
    resumed = Controller(cfg, run_dir, log=print, resume_from=latest)
    resumed.start()
    try:
        resumed.run()
        prompts_trained += [p for step in resumed.prompt_log for p in step]
    finally:
        resumed.shutdown()
        server.stop(0)
    assert [m["step"] for m in _lines(run_dir)] == [0, 1, 2, 3]
    assert len(prompts_trained) == 4 * 16 and len(set(prompts_trained)) == 4 * 16


def test_a_learner_rank_killed_mid_run_restarts_every_role_from_the_checkpoint(demo_inputs, ray_session, tmp_path):
    from keel.controller.restarts import RunRestarts

    cfg = _config(
        demo_inputs,
        **{
            "controller.steps": 5,
            "controller.max_restarts": 1,
            "checkpoint.every_steps": 1,
            "checkpoint.save_hf": False,
            "learner.replicas": 2,
            "learner.micro_batch_size": 8,
            "learner.resources": {"num_cpus": 0.5},
            "learner.deepspeed.timeout_s": 60.0,
        },
    )
    run_dir = tmp_path / "run"
    runner = RunRestarts(cfg, run_dir, log=print)
    killed, marker, done_at = [], tmp_path / "rank-1-backward", []

    def hook(m):
        done_at.append((m["step"], time.monotonic()))
        if m["step"] == 1 and not killed:  # rank 1 dies in step 2's backward, rank 0 waiting on it
            rank = runner.controller.learners[1]
            _slow_down(rank, "policy", "backward", 5.0, marker)
            _kill_when(marker, _pid(rank), killed)

    t0 = time.monotonic()
    last = runner.run(on_step=hook)
    print("steps done at (s):", [(step, round(t - t0, 1)) for step, t in done_at])
    assert killed and runner.restarts == 1 and time.monotonic() - t0 < 400
    lines = _lines(run_dir)
    # metrics continue from the checkpoint's step: every step once, the later ones after the restart
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4]
    assert [m["run/restarts"] for m in lines][:2] == [0.0, 0.0] and lines[-1]["run/restarts"] == 1.0
    # the lost rank counted once, by role and kind, and still counted after the restart
    assert "errors/learner/lost" not in lines[1] and lines[-1]["errors/learner/lost"] == 1.0
    assert last.version == 5
    state = json.loads((sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    assert state["finished"] and state["step"] == 5
