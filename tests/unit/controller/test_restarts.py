"""RunRestarts' rules, with a stand-in controller beside the real one (the real run, a learner rank
SIGKILLed mid-run, is tests/integration/test_role_restarts.py): a RoleFailed starts the run again
from the latest checkpoint at most controller.max_restarts times; anything else is raised at once;
every controller is shut down."""

from __future__ import annotations

import pytest

from keel.config import parse_config
from keel.controller.checkpoint import CheckpointStore
from keel.controller.restarts import RunRestarts
from keel.controller.supervisor import RoleFailed, RoleOutage


def _cfg(max_restarts: int):
    return parse_config(
        {
            "model": {"policy": "p"},
            "data": {"prompts": "x.jsonl"},
            "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
            "controller": {"max_restarts": max_restarts},
        }
    )


class _Flaky:
    """Fails with `errors[i]` on its i-th start (None: runs to the end); records what it was given."""

    def __init__(self, errors, seen):
        self.errors, self.seen = errors, seen

    def __call__(self, cfg, run_dir, log, resume_from, run_restarts, progress, errors):
        outer = self

        class Controller:
            def __init__(self):
                self.shut = False
                outer.seen.append(
                    {"resume_from": resume_from, "run_restarts": run_restarts, "ctrl": self, "errors": errors}
                )

            def request_stop(self):
                pass

            def start(self):
                error = outer.errors[len(outer.seen) - 1]
                if error is not None:
                    raise error

            def run(self, on_step=None):
                return []

            def shutdown(self):
                self.shut = True

        return Controller()


def _checkpoint(run_dir, step):
    store = CheckpointStore(run_dir / "checkpoints", 2)
    return store.commit(store.stage(step), step, {"step": step})


def test_a_role_failure_restarts_from_the_latest_checkpoint_up_to_max_restarts(tmp_path):
    seen = []
    errors = [RoleFailed("learner rank 1: lost", "learner", "lost"), RoleFailed("rollout: chunk 0", "rollout"), None]
    first = _checkpoint(tmp_path, 3)
    runner = RunRestarts(_cfg(2), tmp_path, log=lambda *_: None, make=_Flaky(errors, seen))
    runner.run()
    assert runner.restarts == 2 and [s["run_restarts"] for s in seen] == [0, 1, 2]
    assert [s["resume_from"] for s in seen] == [None, first, first]
    assert all(s["ctrl"].shut for s in seen)
    # each failure counted once, by role and kind, in the one tally every controller was handed
    assert all(s["errors"] is runner.errors for s in seen)
    assert runner.errors.metrics() == {"errors/learner/lost": 1.0, "errors/rollout/exhausted": 1.0}


def test_past_max_restarts_the_failure_is_raised(tmp_path):
    seen = []
    runner = RunRestarts(_cfg(1), tmp_path, log=lambda *_: None, make=_Flaky([RoleFailed("a"), RoleFailed("b")], seen))
    with pytest.raises(RoleFailed, match="b"):
        runner.run()
    assert runner.restarts == 1 and len(seen) == 2 and all(s["ctrl"].shut for s in seen)


def test_an_outage_is_counted_and_raised_without_a_restart(tmp_path):
    seen = []
    outage = RoleOutage("reward: server unreachable", "reward", "outage")
    runner = RunRestarts(_cfg(3), tmp_path, log=lambda *_: None, make=_Flaky([outage, None], seen))
    with pytest.raises(RoleOutage):
        runner.run()
    assert runner.restarts == 0 and len(seen) == 1 and runner.errors.metrics() == {"errors/reward/outage": 1.0}


def test_other_errors_are_not_restarted(tmp_path):
    seen = []
    runner = RunRestarts(_cfg(3), tmp_path, log=lambda *_: None, make=_Flaky([ValueError("bad data"), None], seen))
    with pytest.raises(ValueError, match="bad data"):
        runner.run()
    assert runner.restarts == 0 and len(seen) == 1 and seen[0]["ctrl"].shut
