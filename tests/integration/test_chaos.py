"""Chaos: a 30-step PPO run on the demo task with 2 rollout workers, in which a random rollout
worker is SIGKILLed by the OS every few steps (at a random moment: while it generates, while the
learner trains, or while weights are published) and the reward server goes away once and comes
back. The run finishes, every prompt is trained exactly once per epoch, each kill cost exactly one
replacement, and the reward still rises."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from integration.configs import demo_config

STEPS, PROMPTS, EPOCH = 30, 32, 512
KILL_AFTER_STEPS = (2, 7, 12, 17, 21, 24)
REWARD_DOWN_AFTER_STEP = 14


def test_a_run_survives_killed_workers_and_a_reward_server_restart(demo_inputs, ray_session, tmp_path):
    import ray

    from keel.config import GrpcConfig
    from keel.controller.loop import Controller
    from keel.reward.server import RewardServerConfig, start_reward_server

    base = demo_config(*demo_inputs)

    def reward_server(port=0):
        return start_reward_server(RewardServerConfig(reward=base.reward, grpc=GrpcConfig(auth=False), port=port))

    servers = [reward_server()]
    port = servers[0].port
    cfg = demo_config(
        *demo_inputs,
        **{
            "rollout.replicas": 2,
            "rollout.resources": {"num_cpus": 0.25},
            "controller.steps": STEPS,
            "controller.prompts_per_step": PROMPTS,
            "algorithm.mini_batch_size": PROMPTS,
            "controller.rollout_timeout_s": 30.0,
            "transport.reward": "grpc",
            "transport.grpc.auth": False,
            "transport.grpc.retries": 2,
            "transport.grpc.reward_address": f"127.0.0.1:{port}",
        },
    )
    controller = Controller(cfg, tmp_path / "run", log=print)
    rng = random.Random(0)
    kills: list[int] = []  # the processes this test killed
    timers: list[threading.Timer] = []

    def kill(pid):
        os.kill(pid, signal.SIGKILL)
        kills.append(pid)

    def chaos(m):
        # a kill lands within half a second (a step takes 0.2-2 s here: in the rollout, scoring, the
        # update or the weight sync); the next victim is chosen only once the last one is replaced
        if m["step"] in KILL_AFTER_STEPS and not (timers and timers[-1].is_alive()):
            victim = rng.choice(controller.rollout)
            pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
            timers.append(threading.Timer(rng.uniform(0.05, 0.5), kill, args=(pid,)))
            timers[-1].start()
        if m["step"] == REWARD_DOWN_AFTER_STEP:
            servers[0].stop(0)
            threading.Timer(3.0, lambda: servers.append(reward_server(port))).start()

    t0 = time.monotonic()
    controller.start()
    try:
        history = controller.run(on_step=chaos)
    finally:
        controller.shutdown()
        for server in servers:
            server.stop(0)
    print(f"chaos: {len(kills)} kills, {time.monotonic() - t0:.0f}s")
    steps = [m for m in history if "reward_mean" in m]
    assert [m["step"] for m in steps] == list(range(STEPS))
    assert len(kills) >= len(KILL_AFTER_STEPS) - 1 and steps[-1]["rollout/restarts"] == len(kills), kills
    assert steps[-1]["reward/outage_s"] > 1.0 and len(servers) == 2
    # each kill counted once as a lost rollout worker (or, killed before it answered the weight
    # update's deadline, a timeout); the outage as failed tries
    errors = steps[-1]
    assert errors.get("errors/rollout/lost", 0) + errors.get("errors/rollout/timeout", 0) == len(kills), errors
    assert errors["errors/reward/unavailable"] >= 1
    assert sorted(errors["rollout/weight_versions"].values()) == [STEPS, STEPS]  # both serve the last version
    # every prompt exactly once per epoch (16 steps of 32 prompts make an epoch of 512)
    per_epoch = EPOCH // PROMPTS
    for start in range(0, STEPS, per_epoch):
        trained = [p for batch in controller.prompt_log[start : start + per_epoch] for p in batch]
        assert len(trained) == len(set(trained)) == PROMPTS * len(controller.prompt_log[start : start + per_epoch])
    rewards = [m["reward_mean"] for m in steps]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05, rewards
