"""LearnerReference (model.lora): the reference log-probs come from the learner ranks, each its share,
joined in rank order; it answers the step as the reference actors do. Stand-in learner ranks as real
Ray actors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_shares_of_every_rank_joined_in_rank_order(ray_session):
    import ray

    from keel.controller.learner_reference import LearnerReference
    from keel.controller.supervisor import RoleFailed

    class Rank:
        def __init__(self, rank: int, rows: int | None):
            self.rank, self.rows = rank, rows

        def reference_logprobs(self, batch: torch.Tensor):
            if self.rows is None:  # a rank past a batch smaller than the world
                return None
            return batch[self.rank * 2 : self.rank * 2 + self.rows] * -1.0

    ranks = [ray.remote(Rank).options(num_cpus=0.1).remote(r, n) for r, n in enumerate((2, 1, None))]
    timeouts = SimpleNamespace(score_timeout_s=30.0)
    reference = LearnerReference(SimpleNamespace(learners=ranks, timeouts=timeouts))
    batch = torch.arange(15.0).reshape(5, 3)
    joined = reference.submit(batch, ray.put(batch), "logprobs", step=0).result()
    assert torch.equal(joined, -batch[:3])  # rank 0's two rows, then rank 1's one; rank 2 had none
    assert len(reference.take_latencies()) == 1 and reference.take_latencies() == []
    assert reference.actors == [] and reference.restarts == 0 and reference.name == "reference"
    with pytest.raises(ValueError, match="answers logprobs only"):
        reference.submit(batch, None, "score", step=0)

    ray.kill(ranks[1])
    with pytest.raises(RoleFailed, match="learner rank 1: lost during reference log-probs at step 3"):
        reference.submit(batch, ray.put(batch), "logprobs", step=3).result()
    reference.close()
