"""The error tally's rules (keel.controller.errors); the counts from real losses are checked in
tests/integration/test_prometheus.py and test_role_restarts.py."""

from __future__ import annotations

import threading

import pytest

from keel.controller.errors import ErrorTally, role_of


def test_counts_by_role_and_kind_only_those_that_happened():
    tally = ErrorTally()
    assert tally.metrics() == {}
    for role, kind in [("rollout", "lost"), ("reward", "unavailable"), ("rollout", "lost"), ("rollout", "timeout")]:
        tally.add(role, kind)
    assert tally.metrics() == {
        "errors/reward/unavailable": 1.0,
        "errors/rollout/lost": 2.0,
        "errors/rollout/timeout": 1.0,
    }
    assert tally.count("rollout", "lost") == 2 and tally.count("learner", "lost") == 0


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown error kind 'crashed'"):
        ErrorTally().add("rollout", "crashed")


def test_threads_adding_at_once_lose_no_count():
    tally = ErrorTally()

    def add():
        for _ in range(2000):
            tally.add("reward", "timeout")

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tally.count("reward", "timeout") == 8000


def test_role_of_names():
    assert [role_of(w) for w in ("learner rank 1", "rollout worker 0", "reward actor 2", "")] == [
        "learner",
        "rollout",
        "reward",
        "run",
    ]
