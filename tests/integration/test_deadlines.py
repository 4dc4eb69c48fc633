"""The supervisor's deadlines on real Ray actors: a learner call past controller.update_timeout_s
(or, for the log-prob pass, controller.score_timeout_s) raises RoleFailed naming the ranks, the
call, the step and the setting; a lost rank is named at once, whatever the deadline."""

from __future__ import annotations

import time

import pytest

from keel.config import parse_config
from keel.controller.supervisor import RoleFailed, Supervisor


def _supervisor(ranks: int) -> Supervisor:
    cfg = parse_config(
        {
            "model": {"policy": "p"},
            "data": {"prompts": "x.jsonl"},
            "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
            "controller": {"update_timeout_s": 1.5, "score_timeout_s": 1.0},
        }
    )
    import ray

    class Rank:  # stands in for a learner rank: each call sleeps as long as it is told (defined here:
        # Ray ships it by value, the workers cannot import the tests)
        def update(self, seconds):
            time.sleep(seconds)
            return "updated"

        def old_logprobs_and_values(self, seconds):
            time.sleep(seconds)
            return "scored"

    sup = Supervisor(cfg, log=lambda *_: None)
    sup.learners = [ray.remote(Rank).options(num_cpus=0, max_concurrency=2).remote() for _ in range(ranks)]
    return sup


def test_learner_calls_have_the_deadline_of_their_kind(ray_session):
    import ray

    sup = _supervisor(2)
    try:
        assert sup.on_learners("update", 0.0, step=3) == ["updated", "updated"]
        t0 = time.monotonic()
        expected = r"learner rank 0, learner rank 1: update at step 3 gave no answer within "
        expected += r"controller\.update_timeout_s \(1\.5s\)"
        with pytest.raises(RoleFailed, match=expected):
            sup.on_learners("update", 30.0, step=3)
        assert time.monotonic() - t0 < 10
        expected = r"log-prob pass at step 4 gave no answer within controller\.score_timeout_s \(1s\)"
        with pytest.raises(RoleFailed, match=expected):
            sup.on_learners("old_logprobs_and_values", 30.0, what="log-prob pass", step=4, kind="score")
    finally:
        for actor in sup.learners:
            ray.kill(actor)


def test_a_lost_rank_is_named_at_once(ray_session):
    import ray

    sup = _supervisor(2)
    assert sup.on_learners("update", 0.0, step=5) == ["updated", "updated"]
    ray.kill(sup.learners[1])
    t0 = time.monotonic()
    with pytest.raises(RoleFailed, match=r"learner rank 1: lost during update at step 5"):
        sup.on_learners("update", 0.5, step=5)
    assert time.monotonic() - t0 < 1.4  # before the update deadline (1.5 s)
    ray.kill(sup.learners[0])
