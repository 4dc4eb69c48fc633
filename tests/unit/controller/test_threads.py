"""How many threads a role's torch/OpenMP pools get: the node's cores in sync mode (phases take
turns), the role's CPU share in async mode, its own setting above both; and Ray's actors really
run with that many."""

from __future__ import annotations

from keel.config import Resources
from keel.controller.actors import role_threads, thread_env


def test_sync_time_shares_the_node_and_async_splits_it():
    half = Resources(num_cpus=0.5)
    assert role_threads("sync", half, node_cpus=16) == 16
    assert role_threads("async", half, node_cpus=16) == 1
    assert role_threads("async", Resources(num_cpus=6), node_cpus=16) == 6
    assert role_threads("sync", half, node_cpus=16, explicit=3) == 3
    assert role_threads("async", half, node_cpus=16, explicit=3) == 3
    assert role_threads("sync", Resources(num_cpus=1, num_gpus=1), node_cpus=16) is None  # the library's own
    assert thread_env(None) == {}
    assert thread_env(4)["OMP_NUM_THREADS"] == "4"


def test_actors_get_the_threads_of_their_node(ray_session):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from keel.controller.actors import remote
    from keel.controller.placement import in_group, node_cpus

    class Probe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    pg = placement_group([{"CPU": 0.25}, {"CPU": 0.25}])
    ray.get(pg.ready(), timeout=60)
    try:
        cores = node_cpus(pg, 0)
        assert cores == 2  # the test Ray's num_cpus, not the host's core count
        res = Resources(num_cpus=0.25)
        sync = remote(Probe, res, thread_env(role_threads("sync", res, cores)), in_group(pg, 0)).remote()
        split = remote(Probe, res, thread_env(role_threads("async", res, cores)), in_group(pg, 1)).remote()
        assert ray.get([sync.threads.remote(), split.threads.remote()], timeout=60) == [2, 1]
    finally:
        remove_placement_group(pg)
