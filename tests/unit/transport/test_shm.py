"""The learner's shared-memory weight buffer, read by another process on the node: what the reader
maps is what the writer wrote (cast to the rollout's dtype), a handle of another version or node
is refused, and a dead writer's memory is gone with it."""

from __future__ import annotations

import time

import pytest
import torch

from keel.transport.shm import NotOnThisNode, SharedWeights, StaleHandle, read_shared


def _reader():
    class Reader:
        def read(self, handle, node_id):
            state = read_shared(handle, node_id)
            return {k: v.clone() for k, v in state.items()}

        def error(self, handle, node_id):
            try:
                read_shared(handle, node_id)
            except (NotOnThisNode, StaleHandle) as err:
                return type(err).__name__, str(err)
            return None

    return Reader


def test_another_process_maps_each_version_as_written(ray_session):
    import ray

    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(300, 7, generator=g), "b": torch.randn(5, generator=g), "ids": torch.arange(4)}
    writer = SharedWeights("node-a")
    reader = ray.remote(_reader()).options(num_cpus=0.1).remote()
    try:
        v1 = writer.write(1, state, torch.bfloat16)
        got = ray.get(reader.read.remote(v1, "node-a"))
        assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], state["w"].to(torch.bfloat16))
        assert torch.equal(got["ids"], state["ids"])  # integers keep their dtype
        assert v1.total_bytes == 300 * 7 * 2 + 5 * 2 + 4 * 8

        moved = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
        v2 = writer.write(2, moved, torch.float32)
        assert torch.equal(ray.get(reader.read.remote(v2, "node-a"))["w"], moved["w"])
        kind, message = ray.get(reader.error.remote(v1, "node-a"))  # version 1 was overwritten
        assert kind == "StaleHandle" and "holds version 2, not 1" in message
        kind, message = ray.get(reader.error.remote(v2, "node-b"))
        assert kind == "NotOnThisNode" and "node-a" in message
    finally:
        writer.close()
        ray.kill(reader)


def test_a_dead_writers_buffer_is_gone(ray_session):
    import ray

    class Writer:
        def write(self):
            self.shared = SharedWeights("node-a")
            return self.shared.write(1, {"w": torch.ones(10)}, torch.float32)

    writer = ray.remote(Writer).options(num_cpus=0.1).remote()
    handle = ray.get(writer.write.remote())
    assert torch.equal(read_shared(handle, "node-a")["w"], torch.ones(10))
    ray.kill(writer)
    time.sleep(1.0)
    with pytest.raises(StaleHandle, match="buffer is gone"):
        _fresh(handle)


def _fresh(handle):
    """Read as a process that never mapped the buffer before (this one did, above)."""
    from keel.transport import shm

    shm._maps.pop((handle.pid, handle.fd), None)
    return read_shared(handle, "node-a")
