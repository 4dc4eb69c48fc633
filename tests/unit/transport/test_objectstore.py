"""Weights through the Ray object store as numpy arrays: what comes out is what went in, bfloat16
included, and a consumer maps the store's memory instead of unpickling a copy."""

from __future__ import annotations

import torch

from keel.transport.objectstore import pack, unpack


def test_pack_round_trips_every_dtype_through_the_store(ray_session):
    import ray

    g = torch.Generator().manual_seed(0)
    state = {
        "w32": torch.randn(64, 32, generator=g),
        "w16": torch.randn(300, generator=g).to(torch.bfloat16),
        "ids": torch.arange(10),
        "view": torch.randn(8, 8, generator=g).t(),  # not contiguous
    }
    back = unpack(ray.get(ray.put(pack(state))))
    assert set(back) == set(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name


def test_a_consumer_maps_the_stored_bytes_without_a_copy(ray_session):
    import ray

    state = {"w": torch.ones(1 << 20)}  # 4 MiB: large enough for the shared-memory store
    array, _ = ray.get(ray.put(pack(state)))["w"]
    assert not array.flags.writeable and not array.flags.owndata  # a view of the store's memory
    t = unpack({"w": (array, "float32")})["w"]
    assert t.data_ptr() == array.__array_interface__["data"][0]
