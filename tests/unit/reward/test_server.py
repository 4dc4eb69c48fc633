"""DynamicBatcher without gRPC: callers isolated from each other's bad samples, and a close that
does not hang on a scorer that never returns."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from keel.reward.model import RewardError
from keel.reward.server import DynamicBatcher


class Picky:
    """One source scoring 1.0 per sample; KeyError on a sample without "answer", RuntimeError on one marked "boom"."""

    name = "picky"

    def __init__(self):
        self.calls: list[list[str]] = []

    def score_sources(self, prompts, responses, metadata, ids):
        self.calls.append(list(ids))
        for meta in metadata:
            if "boom" in meta:
                raise RuntimeError("the scorer broke")
            meta["answer"]  # noqa: B018 - raises KeyError like a reward function reading it
        return torch.ones(len(prompts), 1)  # (B, S): one source


def _request(name, n, bad_row=None, bad_meta=None):
    metadata = [{"answer": "1"} for _ in range(n)]
    if bad_row is not None:
        metadata[bad_row] = bad_meta
    return [""] * n, [""] * n, metadata, [f"{name}{i}" for i in range(n)]


def test_each_caller_gets_its_own_outcome_and_names_only_its_own_sample():
    model = Picky()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=64, max_wait_ms=100)
        requests = [_request("a", 2), _request("b", 4, 2, {}), _request("c", 1, 0, {"answer": "1", "boom": ""})]
        results = await asyncio.gather(*(batcher.score(*r) for r in requests), return_exceptions=True)
        await batcher.close()
        return results

    good, bad, broken = asyncio.run(main())
    assert good == [[1.0], [1.0]]  # a row of source scores per sample
    assert isinstance(bad, RewardError)
    assert str(bad) == "sample b2 (row 2): reward picky failed: KeyError: 'answer'"
    assert isinstance(broken, RuntimeError) and not isinstance(broken, RewardError)  # the server's error
    assert model.calls == [
        ["a0", "a1", "b0", "b1", "b2", "b3", "c0"],  # grouped: fails
        ["a0", "a1"],  # each request alone
        ["b0", "b1", "b2", "b3"],
        ["b0", "b1"],  # bisecting b's prefixes for its first bad sample
        ["b0", "b1", "b2"],
        ["c0"],
    ]


def test_close_gives_up_on_a_scorer_that_never_returns():
    release = threading.Event()

    class Hung:
        name = "hung"

        def score_sources(self, *args):
            release.wait()
            return torch.ones(1, 1)

    async def main():
        batcher = DynamicBatcher(Hung(), max_batch_size=8, max_wait_ms=0)
        pending = asyncio.ensure_future(batcher.score([""], [""], [{}], ["x"]))
        await asyncio.sleep(0.1)  # the scorer is now stuck
        started = time.monotonic()
        await batcher.close(timeout_s=0.2)
        took = time.monotonic() - started
        with pytest.raises(RuntimeError, match="reward server stopped"):
            await pending
        return took

    try:
        assert asyncio.run(main()) < 1.0
    finally:
        release.set()
