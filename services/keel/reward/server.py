"""`keel serve reward`: the reward core behind a grpc.aio RewardService, shareable by many jobs.

Requests from concurrent callers are batched dynamically: the batcher takes whatever is
queued, up to `max_batch_size` samples, waiting at most `max_wait_ms` for more, scores the
lot in one call on a scoring thread (so the event loop keeps accepting calls), and hands each
caller its slice. Concurrency is bounded by the server (RESOURCE_EXHAUSTED past
`max_concurrency` in-flight calls). SIGTERM marks the server NOT_SERVING, lets in-flight
requests finish within `grace_s`, then exits.

`RewardServer` is the server itself (its coroutines run on one event loop); `start_reward_server`
runs one on a background thread for in-process use (the job's own reward role, tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from pydantic import Field

from keel.config import GrpcConfig, RewardConfig, Section
from keel.reward.model import RewardError, RewardModel
from keel.transport.pb import reward_pb2, reward_pb2_grpc


class RewardServerConfig(Section):
    """A standalone reward server: the reward, its gRPC settings, and batching limits."""

    reward: RewardConfig = Field(description="What produces the scores (same section as in a run config).")
    grpc: GrpcConfig = Field(default_factory=GrpcConfig, description="Bind address, auth, TLS, message sizes.")
    port: int = Field(50051, ge=0, le=65535, description="Port to listen on (0 = any free port).")
    max_batch_size: int = Field(
        64, ge=1, description="Most samples from several requests grouped into one scoring call."
    )
    max_wait_ms: float = Field(5.0, ge=0.0, description="How long a batch waits for more samples.")
    max_request_samples: int = Field(
        4096, ge=1, description="Most samples in one request; more are refused with INVALID_ARGUMENT."
    )
    max_concurrency: int = Field(64, ge=1, description="In-flight calls; more are refused with RESOURCE_EXHAUSTED.")
    grace_s: float = Field(30.0, ge=0.0, description="On SIGTERM, time in-flight calls get to finish.")


@dataclass
class _Job:
    prompts: list[str]
    responses: list[str]
    metadata: list[dict[str, str]]
    ids: list[str]
    future: asyncio.Future


class DynamicBatcher:
    """Groups concurrent scoring jobs into batches of at most `max_batch_size` samples (a larger
    job is scored alone). Create and use it on the server's event loop."""

    def __init__(self, model: RewardModel, max_batch_size: int, max_wait_ms: float):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batches = 0  # how many model calls were made (for tests and metrics)
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        # One scoring thread: the model is called by one caller at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-score")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def score(self, prompts, responses, metadata, ids) -> list[float]:
        job = _Job(prompts, responses, metadata, ids, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def close(self) -> None:
        """Score what is queued, then stop."""
        await self._queue.put(None)
        await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        carry: _Job | None = None  # a job that did not fit the last batch starts the next one
        while True:
            job = carry if carry is not None else await self._queue.get()
            carry = None
            if job is None:
                return
            jobs, size, stop = [job], len(job.prompts), False
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch_size:
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if nxt is None:
                    stop = True
                    break
                if size + len(nxt.prompts) > self.max_batch_size:
                    carry = nxt
                    break
                jobs.append(nxt)
                size += len(nxt.prompts)
            await self._score(jobs)
            if stop:
                return

    async def _score(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # a caller whose deadline passed is gone
        if not jobs:
            return
        flat = [
            (p, r, m, i) for j in jobs for p, r, m, i in zip(j.prompts, j.responses, j.metadata, j.ids, strict=True)
        ]
        prompts, responses, metadata, ids = (list(x) for x in zip(*flat, strict=True))
        self.batches += 1
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._executor, self.model.score, prompts, responses, metadata, ids)
        except Exception as err:  # noqa: BLE001 - every waiting caller gets the error
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        values = scores.tolist()
        start = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(values[start : start + len(j.prompts)])
            start += len(j.prompts)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, batcher: DynamicBatcher, scorer_name: str, max_samples: int):
        self.batcher = batcher
        self.scorer_name = scorer_name
        self.max_samples = max_samples

    async def Score(self, request, context):
        if not request.samples:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "samples: empty request")
        if len(request.samples) > self.max_samples:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"samples: {len(request.samples)} exceeds max_request_samples {self.max_samples}",
            )
        # An empty response is legitimate (the policy stopped at once); the reward decides its worth.
        ids = [s.sample_id or str(i) for i, s in enumerate(request.samples)]
        error = None
        try:
            scores = await self.batcher.score(
                [s.prompt for s in request.samples],
                [s.response for s in request.samples],
                [dict(s.metadata) for s in request.samples],
                ids,
            )
        except RewardError as err:
            error = (grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:  # noqa: BLE001 - the caller sees why, the server keeps serving
            error = (grpc.StatusCode.INTERNAL, f"reward {self.scorer_name} failed: {err}")
        if error is not None:
            await context.abort(*error)
        return reward_pb2.ScoreResponse(request_id=request.request_id, scores=scores, scorer=self.scorer_name)


SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServer:
    """The reward core, a dynamic batcher and a grpc.aio server with health and reflection.
    `start` and `stop` run on the event loop that serves it."""

    def __init__(self, cfg: RewardServerConfig):
        self.cfg = cfg
        self.port: int | None = None
        self.batcher: DynamicBatcher | None = None

    async def start(self) -> int:
        """Load the reward, bind, serve; returns the bound port."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1.health import SERVICE_NAME as HEALTH_NAME
        from grpc_health.v1.health import aio as health_aio
        from grpc_reflection.v1alpha import reflection

        from keel.transport.security import make_aio_server

        cfg = self.cfg
        model = RewardModel(cfg.reward)
        self.batcher = DynamicBatcher(model, cfg.max_batch_size, cfg.max_wait_ms)
        self._server, self.port = make_aio_server(cfg.grpc, cfg.port, max_concurrency=cfg.max_concurrency)
        servicer = RewardServicer(self.batcher, model.name, cfg.max_request_samples)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, self._server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME], self._server)
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.scorer = model.name
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING for new health checks, finish in-flight calls (up to grace_s), then stop."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        await self.batcher.close()

    async def serve_until_signal(self, on_ready=None) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully (what `keel serve reward` runs)."""
        import signal

        port = await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if on_ready:
            on_ready(port)
        await stop.wait()
        print("shutting down: finishing in-flight requests", flush=True)
        await self.stop(self.cfg.grace_s)


class RunningRewardServer:
    """A `RewardServer` on its own event loop in a background thread."""

    def __init__(self, cfg: RewardServerConfig):
        self.server = RewardServer(cfg)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-server", daemon=True)
        self._thread.start()
        try:
            self.port = self._run(self.server.start())
        except BaseException:
            self._close_loop()
            raise

    @property
    def batcher(self) -> DynamicBatcher:
        return self.server.batcher

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def stop(self, grace_s: float) -> None:
        self._run(self.server.stop(grace_s))
        self._close_loop()


def start_reward_server(cfg: RewardServerConfig) -> RunningRewardServer:
    """Start a reward server on a background thread; `.port` is bound, `.stop(grace_s)` ends it."""
    return RunningRewardServer(cfg)


class RewardServerRole:
    """The reward role of a run whose reward channel is grpc: the reward core served over gRPC
    from this process (a Ray actor), called by the controller through a `RewardClient`."""

    def __init__(self, reward: RewardConfig, grpc_cfg: GrpcConfig, max_request_samples: int):
        cfg = RewardServerConfig(
            reward=reward,
            grpc=grpc_cfg,
            port=grpc_cfg.reward_port,
            max_request_samples=max(max_request_samples, 1),
        )
        self._running = start_reward_server(cfg)
        self._grpc = grpc_cfg

    def address(self) -> str:
        from keel.transport.security import advertised_address

        return advertised_address(self._grpc, self._running.port)

    def samples_scored(self) -> int:
        """How many samples this replica has scored (several replicas share each batch)."""
        return self._running.batcher.model.samples_scored()

    def stop(self) -> None:
        self._running.stop(0)
