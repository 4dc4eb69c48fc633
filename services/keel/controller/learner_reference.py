"""The reference policy computed by the learner (model.lora): the policy with its adapter off, so no
reference actor holds a second copy of the weights.

`LearnerReference` answers the controller as the reference actors do (`submit(traj, traj_ref,
"logprobs", step)`, whose `.result()` is the (B, R) log-probs, and `take_latencies`), so a step reads
the same either way; `Supervisor.start` picks one. Every learner rank scores its share of the batch,
as in the learner's own log-prob pass (`Learner.reference_logprobs`), and the shares are joined in
rank order. The calls are sent at once, before the step's other learner calls, so every rank runs
them in the same order.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from keel.controller.replicas import Joined
from keel.trajectory import Trajectories


class LearnerReference:
    name = "reference"

    def __init__(self, supervisor):
        self.supervisor = supervisor  # its learner ranks, and the deadline of their calls
        self.actors: list = []  # no actor of its own: a lost learner rank fails the run (RoleFailed)
        self.restarts = 0
        self.latencies: list[float] = []  # seconds of each answered call since the last take_latencies
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference")

    def submit(self, traj: Trajectories, traj_ref, method: str, step: int | None) -> Joined:
        """log pi_ref of the batch at `traj_ref`; `.result()` waits for every rank's share."""
        if method != "logprobs":
            raise ValueError(f"the learner's reference answers logprobs only, not {method!r}")
        start = time.perf_counter()
        learners = self.supervisor.learners
        calls = [(f"learner rank {r}", lr.reference_logprobs.remote(traj_ref)) for r, lr in enumerate(learners)]
        return Joined([self._pool.submit(self._join, calls, step, start)])

    def _join(self, calls: list, step: int | None, start: float) -> torch.Tensor:
        from keel.controller.supervisor import gather

        timeout_s = self.supervisor.timeouts.score_timeout_s
        shares = gather(calls, "reference log-probs", step, timeout_s, "controller.score_timeout_s")
        with self._lock:
            self.latencies.append(time.perf_counter() - start)
        return torch.cat([share for share in shares if share is not None])  # ranks past a small batch have none

    def take_latencies(self) -> list[float]:
        with self._lock:
            out, self.latencies = self.latencies, []
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)
