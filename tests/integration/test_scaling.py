"""Rollout workers added and removed while a run trains (real Ray, real workers and learner):
no prompt lost or trained twice, new workers at the current weights, a request the cluster
cannot hold refused with nothing half-applied."""

from __future__ import annotations

import pytest

from integration.configs import demo_config
from keel.data.tasks import arithmetic_rows, write_jsonl

# leaves room on the 2-CPU test cluster for extra rollout workers of 0.25 CPU each
SMALL = {
    "rollout.resources": {"num_cpus": 0.25},
    "reward.resources": {"num_cpus": 0.25},
    "reference.resources": {"num_cpus": 0.25},
    "learner.resources": {"num_cpus": 0.5},
    "data.id_field": "id",
    "controller.prompts_per_step": 16,
    "controller.placement_timeout_s": 3,
    "algorithm.mini_batch_size": 16,
}


def _prompts(tmp_path, n=64):
    return write_jsonl(arithmetic_rows(n, seed=7), tmp_path / "prompts.jsonl")


def test_scaling_1_2_1_trains_every_prompt_once_per_epoch(demo_inputs, ray_session, tmp_path):
    import ray

    from keel.controller.loop import Controller

    policy, _ = demo_inputs
    ids = [r["id"] for r in arithmetic_rows(64, seed=7)]
    cfg = demo_config(policy, _prompts(tmp_path), **SMALL, **{"controller.steps": 8})
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    controller.start()
    try:
        plan = {2: 2, 5: 1}  # before step k, scale to n
        workers = []
        for step in range(8):
            if step in plan:
                controller.scale_rollout(plan[step])
                ready = ray.get([w.ready.remote() for w in controller.rollout])
                # a new worker holds the current weights before it gets a prompt
                assert [r["weight_version"] for r in ready] == [controller.version] * plan[step]
            workers.append(controller.step()["rollout/workers"])
    finally:
        controller.shutdown()
    assert workers == [1, 1, 2, 2, 2, 1, 1, 1]
    # 16 prompts a step, 64 prompts: steps 0-3 are epoch 0 and 4-7 epoch 1
    for epoch in range(2):
        trained = [pid for step in controller.prompt_log[4 * epoch : 4 * epoch + 4] for pid in step]
        assert sorted(trained) == sorted(ids), f"epoch {epoch}: a prompt lost or trained twice"


def test_a_scale_the_cluster_cannot_hold_changes_nothing(demo_inputs, ray_session, tmp_path):
    from keel.controller.loop import Controller
    from keel.controller.placement import PlacementError

    policy, _ = demo_inputs
    cfg = demo_config(policy, _prompts(tmp_path), **SMALL, **{"controller.steps": 2})
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    controller.start()
    try:
        controller.step()
        # 1.25 CPUs are taken; 6 workers need 1.25 more than the 2-CPU cluster has
        with pytest.raises(PlacementError) as info:
            controller.scale_rollout(6)
        assert "cannot place role 'rollout (scaling 1 -> 6 workers)': 1 x {CPU=0.25} not available" in str(info.value)
        assert "the cluster has free CPU=0" in str(info.value) and "bundle_group" not in str(info.value)
        assert len(controller.rollout) == 1
        with pytest.raises(ValueError, match=r"rollout workers must be in \[1, 16\], got 17"):
            controller.scale_rollout(17)
        metrics = controller.step()  # training goes on with the worker it had
        assert metrics["rollout/workers"] == 1.0 and metrics["weight_version"] == 1
    finally:
        controller.shutdown()


def test_autoscaling_adds_workers_while_rollout_is_slow(demo_inputs, ray_session, tmp_path):
    """A target no rollout can meet: one worker more after each slow step, up to max_replicas."""
    from keel.controller.loop import Controller

    policy, _ = demo_inputs
    autoscale = {"enabled": True, "min_replicas": 1, "max_replicas": 2, "target_wait_s": 1e-4, "patience": 1}
    cfg = demo_config(policy, _prompts(tmp_path), **SMALL, **{"controller.steps": 3, "controller.autoscale": autoscale})
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    controller.start()
    try:
        workers = [controller.step()["rollout/workers"] for _ in range(3)]
    finally:
        controller.shutdown()
    assert workers == [1.0, 2.0, 2.0]


def test_async_drops_a_too_stale_batch_and_trains_its_prompts_fresh(demo_inputs, ray_session, tmp_path):
    """The learner moves two versions past a batch in flight (max_staleness 1): the batch is dropped,
    counted, and its prompts are generated again by the current weights and trained at once."""
    from keel.controller.loop import Controller

    policy, _ = demo_inputs
    extra = {"controller.steps": 3, "controller.mode": "async", "controller.max_staleness": 1}
    cfg = demo_config(policy, _prompts(tmp_path), **SMALL, **extra)
    controller = Controller(cfg, tmp_path / "run", log=lambda *_: None)
    controller.start()
    try:
        controller.step()  # trains batch 0 (v0); the batch for step 2 is now generating with v0
        in_flight = [p.prompt_id for p in controller._inflight.prompts]
        # one more version published outside the loop: the in-flight batch (v0) is now 2 behind v2
        controller.channels.weights.publish(controller.learners, controller.rollout, 2, 120)
        controller.version = 2
        metrics = controller.step()
    finally:
        controller.shutdown()
    assert metrics["rollout/stale_dropped"] == 1.0 and metrics["weight_version"] == 2
    assert controller.prompt_log[1] == in_flight  # the same prompts, made again by v2, none lost
