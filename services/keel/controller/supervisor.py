"""Supervision of the role actors while a step runs: every wait has a deadline, and a rollout
worker that dies or hangs is replaced and its prompts are generated again.

A rollout is launched as one chunk of prompts per worker, each with its own seed (the launch seed
+ 101 x chunk index). `RolloutSupervisor.collect` waits for every chunk up to
`controller.rollout_timeout_s`. A chunk whose worker died (killed, OOM, node gone) or did not
answer in time is re-dispatched: the worker is killed, a new one takes its place in the same
placement bundle, loads the current weights, and generates the same chunk with the same seed, so
every prompt is trained exactly once and the samples are those the lost worker would have made
(given the same weights). Replacements are counted (`rollout/restarts`), and a chunk that fails
`max_attempts` times stops the step with an error naming the role and the step.
"""

from __future__ import annotations

import time

from keel.trajectory import Trajectories


class RoleFailed(RuntimeError):
    """A role that did not recover within its budget: names the role and the step."""


def actor_lost(err: BaseException) -> bool:
    """Whether a Ray error means the actor is gone (died, killed, its node lost) rather than that
    the call raised an ordinary exception."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError | WorkerCrashedError)


class RolloutSupervisor:
    """Collects launched rollouts, replacing lost or hung workers (see the module docstring)."""

    def __init__(self, pool, controller_cfg, max_attempts: int = 3, log=print):
        self.pool = pool  # RolloutPool: owns the worker actors and their placement bundles
        self.timeout_s = controller_cfg.rollout_timeout_s
        self.weight_sync_timeout_s = controller_cfg.weight_sync_timeout_s
        self.max_attempts = max_attempts
        self.log = log
        self.restarts = 0  # workers replaced over the run
        self._replaced: dict[str, object] = {}  # actor id of a replaced worker -> its replacement

    def collect(self, flight, channels, version: int, step: int) -> list[Trajectories]:
        """Every chunk's trajectories, in chunk order. `version` is the weight version a replacement
        worker loads before it generates (the current one); `step` names the step in errors."""
        import ray

        if flight.ready is not None:
            return flight.ready
        rollout = channels.rollout
        results: dict[int, Trajectories] = {}
        pending = dict(enumerate(flight.refs))  # chunk -> ObjectRef
        deadline = {i: time.monotonic() + self.timeout_s for i in pending}
        attempts = dict.fromkeys(pending, 1)
        while pending:
            wait_s = max(0.0, min(deadline[i] for i in pending) - time.monotonic())
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=wait_s)
            failed: list[tuple[int, str]] = []
            for i, ref in list(pending.items()):
                if ref in ready:
                    del pending[i]
                    try:
                        results[i] = rollout.result(flight, i, ref, max(1.0, deadline[i] - time.monotonic()))
                    except Exception as err:
                        if not actor_lost(err):
                            raise
                        failed.append((i, f"lost ({type(err).__name__})"))
                elif time.monotonic() >= deadline[i]:
                    del pending[i]
                    failed.append((i, f"gave no answer within controller.rollout_timeout_s ({self.timeout_s:g}s)"))
            for i, why in failed:
                if attempts[i] >= self.max_attempts:
                    raise RoleFailed(
                        f"rollout: chunk {i} of step {step} failed {attempts[i]} times (last: worker {why})"
                    )
                flight.workers[i] = self.replace(flight.workers[i], channels, version, why)
                pending[i] = rollout.dispatch(flight.workers[i], flight.chunks[i], flight.seed, i)
                deadline[i] = time.monotonic() + self.timeout_s
                attempts[i] += 1
        return [results[i] for i in range(len(flight.refs))]

    def publish(self, channels, learners: list, version: int) -> dict[str, float]:
        """Weights `version` to every rollout worker; one that is gone or hung is replaced by a new
        worker loaded with those weights. Returns the weight channel's metrics."""
        metrics, lost = channels.weights.publish(learners, self.pool.workers, version, self.weight_sync_timeout_s)
        for worker in lost:
            self.replace(worker, channels, version, "lost during the weight update")
        return metrics

    def replace(self, worker, channels, version: int, why: str):
        """Kill `worker`, start one in its place at weight `version`; returns the new actor. A worker
        replaced already (its loss seen first by another call) maps to its replacement."""
        key = worker._actor_id.hex()
        if key in self._replaced:
            return self._replaced[key]
        new = self.pool.replace(worker, channels, version)
        self._replaced[key] = new
        self.restarts += 1
        self.log(f"rollout worker {why}: replaced (restart {self.restarts}); its prompts go to the new one")
        return new
