"""The object-store weight channel: workers on learner rank 0's node map its shared buffer, and a
worker on another node gets the weights through the object store instead, put once however many
such workers there are. Real Ray actors: RolloutWorker's own update methods on a stand-in
generator, a stand-in learner rank that writes a real SharedWeights buffer."""

from __future__ import annotations

import torch


def test_mapped_on_the_node_and_through_the_store_elsewhere(ray_session):
    import ray

    from keel.controller.channels import ObjectStoreWeights

    class Rank0:
        def __init__(self):
            self.state = {"w": torch.arange(6.0).reshape(2, 3), "ids": torch.arange(3)}
            self.packed = 0

        def export_shared(self, version):
            from keel.transport.shm import SharedWeights

            if not hasattr(self, "shared"):
                self.shared = SharedWeights(ray.get_runtime_context().get_node_id())
            self.state = {k: v + 1 if v.is_floating_point() else v for k, v in self.state.items()}
            return self.shared.write(version, self.state, torch.float32)

        def export_packed_weights(self):
            from keel.transport.objectstore import pack

            self.packed += 1
            return pack(self.state)

        def packed_count(self):
            return self.packed

    class Worker:
        """RolloutWorker's update methods over a generator that keeps what it is loaded with."""

        def __init__(self, node_id=None):
            from keel.rollout.worker import RolloutWorker

            class Keep:
                def load_weights(self, named):
                    self.loaded = {k: v.clone() for k, v in named}

            self.worker = RolloutWorker.__new__(RolloutWorker)
            self.worker.worker_id, self.worker.weight_version = "w", 0
            self.worker.generator = Keep()
            self.worker._specs = {"w": ((2, 3), torch.float32), "ids": ((3,), torch.int64)}
            self.node_id = node_id  # pretend to be on another node

        def update_weights_shared(self, handle, version):
            if self.node_id is not None:
                handle = handle.__class__(**{**handle.__dict__, "node_id": "another-node"})
            return self.worker.update_weights_shared(handle, version)

        def update_weights(self, state, version):
            return self.worker.update_weights(state, version)

        def loaded(self):
            return self.worker.weight_version, self.worker.generator.loaded

    rank0 = ray.remote(Rank0).options(num_cpus=0.1).remote()
    local = ray.remote(Worker).options(num_cpus=0.1).remote()
    remote_a, remote_b = (ray.remote(Worker).options(num_cpus=0.1).remote("x") for _ in range(2))
    channel = ObjectStoreWeights()
    metrics, answers = channel.publish([rank0], [local, remote_a, remote_b], 1, 60.0)
    assert answers == [1, 1, 1] and metrics["weight_sync/bytes"] == 6 * 4 + 3 * 8  # the version each serves
    expected = torch.arange(6.0).reshape(2, 3) + 1
    for worker in (local, remote_a, remote_b):
        version, loaded = ray.get(worker.loaded.remote())
        assert version == 1 and torch.equal(loaded["w"], expected)
    assert ray.get(rank0.packed_count.remote()) == 1  # one put for both workers elsewhere

    late = ray.remote(Worker).options(num_cpus=0.1).remote("x")  # a worker added later, elsewhere
    channel.catch_up(late, 1, 60.0)
    assert torch.equal(ray.get(late.loaded.remote())[1]["w"], expected)
    assert ray.get(rank0.packed_count.remote()) == 1  # the version already in the store is reused
    for actor in (rank0, local, remote_a, remote_b, late):
        ray.kill(actor)
