"""A run survives a lost rollout worker: killed by the OS mid-step (SIGKILL of its process, as an
OOM kill or a lost node looks), or hung in generate. The controller notices within
controller.rollout_timeout_s, replaces the worker (at the current weights), generates the lost
prompts again, and the step completes with every prompt trained exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from integration.configs import demo_config

STEPS = 3
PROMPTS = 16


def _config(demo_inputs, **extra):
    return demo_config(
        *demo_inputs,
        **{
            "rollout.replicas": 2,
            "rollout.resources": {"num_cpus": 0.25},
            "controller.steps": STEPS,
            "controller.prompts_per_step": PROMPTS,
            "algorithm.mini_batch_size": 16,
            "controller.rollout_timeout_s": 20.0,
            **extra,
        },
    )


def _slow_down(worker, seconds: float) -> None:
    """Make the worker's generate take `seconds` longer (or hang, for a long time) from now on."""
    import ray

    def patch(self, seconds):
        original = self.generator.generate

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return original(*args, **kwargs)

        self.generator.generate = slow

    ray.get(worker.__ray_call__.remote(patch, seconds))


def _pid(worker) -> int:
    import ray

    return ray.get(worker.__ray_call__.remote(lambda self: os.getpid()))


def _run(controller, during_step_2):
    """Run every step; `during_step_2(controller)` is called as step 2 begins."""

    def hook(m):
        if m["step"] == 0:
            during_step_2(controller)

    controller.start()
    try:
        return controller.run(on_step=hook)
    finally:
        controller.shutdown()


def _check_every_prompt_once(controller, history, versions=tuple(range(STEPS))):
    trained = [pid for step in controller.prompt_log for pid in step]
    assert len(controller.prompt_log) == STEPS and all(len(set(s)) == PROMPTS for s in controller.prompt_log)
    assert len(trained) == len(set(trained))  # within the epoch (512 prompts), none twice
    steps = [m for m in history if "reward_mean" in m]
    assert [m["weight_version"] for m in steps] == list(versions)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_worker_killed_mid_step_is_replaced_and_its_prompts_generated_again(demo_inputs, ray_session, tmp_path, mode):
    from keel.controller.loop import Controller

    extra = {"controller.mode": "async", "controller.max_staleness": 1} if mode == "async" else {}
    controller = Controller(_config(demo_inputs, **extra), tmp_path / "run", log=print)
    killed = []

    def kill_soon(ctrl):
        victim = ctrl.rollout[0]
        _slow_down(victim, 3.0)  # so that the kill lands while it generates
        pid = _pid(victim)
        timer = threading.Timer(1.0, lambda: (os.kill(pid, signal.SIGKILL), killed.append(pid)))
        timer.start()

    t0 = time.monotonic()
    history = _run(controller, kill_soon)
    assert killed, "the worker was not killed"
    steps = [m for m in history if "reward_mean" in m]
    assert steps[-1]["rollout/restarts"] == 1.0 and steps[0]["rollout/restarts"] == 0.0
    # async: step k trains the batch made during step k - 1, by weights one version behind
    _check_every_prompt_once(controller, history, [0, 0, 1] if mode == "async" else [0, 1, 2])
    assert time.monotonic() - t0 < 300


def test_a_hung_worker_is_replaced_after_the_rollout_timeout(demo_inputs, ray_session, tmp_path):
    from keel.controller.loop import Controller

    controller = Controller(_config(demo_inputs, **{"controller.rollout_timeout_s": 8.0}), tmp_path / "run")
    waits = []

    def hang(ctrl):
        _slow_down(ctrl.rollout[1], 3600.0)
        waits.append(time.monotonic())

    history = _run(controller, hang)
    steps = [m for m in history if "reward_mean" in m]
    assert steps[1]["rollout/restarts"] == 1.0
    # noticed at the deadline, not an hour later: the step's rollout took about the timeout
    assert 8.0 <= steps[1]["time/rollout"] < 8.0 + 90.0, steps[1]["time/rollout"]
    _check_every_prompt_once(controller, history)
