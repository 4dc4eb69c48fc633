"""`keel serve reward`: the reward core behind a grpc.aio RewardService, shareable by many jobs.

Requests from concurrent callers are batched dynamically: the batcher takes whatever is
queued, up to `max_batch_size` samples, waiting at most `max_wait_ms` for more, scores the
lot in one call on a scoring thread (so the event loop keeps accepting calls), and hands each
caller its slice: each source's raw scores, which are combined (`keel.reward.combine`) per
request, so that a source's whitening never mixes callers. The reply holds the combined scores
and each source's raw ones (a job combines those over its whole batch). Callers are isolated:
when a grouped call fails, each request is scored again on its own, so one caller's bad sample
fails that caller alone (INVALID_ARGUMENT naming its sample) and never shows another caller's
ids. Concurrency is bounded by the server (RESOURCE_EXHAUSTED past `max_concurrency` in-flight
calls). SIGTERM marks the server NOT_SERVING, lets in-flight requests finish within `grace_s`,
then exits, even when the scorer never returns.

`RewardServer` is the server itself (its coroutines run on one event loop); `start_reward_server`
runs one on a background thread for in-process use (the job's own reward role, tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import torch
from pydantic import Field

from keel.config import GrpcConfig, RewardConfig, Section, reward_sources, source_name
from keel.reward.combine import combine
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
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve Prometheus /metrics (requests by code, latency, batch sizes) on this port (0 = any "
        "free port), bound to grpc.host; unset = off.",
    )


@dataclass
class _Job:
    prompts: list[str]
    responses: list[str]
    metadata: list[dict[str, str]]
    ids: list[str]
    future: asyncio.Future

    def rows(self, stop: int) -> tuple[list, list, list, list]:
        """The first `stop` samples, as the scorer's four arguments."""
        return self.prompts[:stop], self.responses[:stop], self.metadata[:stop], self.ids[:stop]


# A reward function that raises these on a sample is refusing the caller's input: the caller's error.
CALLER_ERRORS = (ValueError, KeyError)


class ScoringThread:
    """The one thread that calls the scorer (the model is called by one caller at a time).

    A daemon thread rather than a ThreadPoolExecutor: the interpreter joins an executor's threads
    at exit, so a scorer that never returns would keep a stopped server's process alive forever.
    """

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="reward-score", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Exit after the call in progress (if it ever returns)."""
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting coroutine
                future.set_exception(err)


class DynamicBatcher:
    """Groups concurrent scoring jobs into batches of at most `max_batch_size` samples (a larger
    job is scored alone). Create and use it on the server's event loop."""

    def __init__(self, model: RewardModel, max_batch_size: int, max_wait_ms: float):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batches = 0  # how many scorer calls were made (for tests and metrics)
        self.exporter = None  # RewardServerExporter, when metrics_port is set
        self.abandoned = False  # close() gave up on a scorer call that did not return
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._thread = ScoringThread()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def score(self, prompts, responses, metadata, ids) -> list[list[float]]:
        """Each sample's row of source scores (the model's `score_sources`), in request order."""
        job = _Job(prompts, responses, metadata, ids, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def close(self, timeout_s: float | None = None) -> None:
        """Score what is queued, then stop. After `timeout_s` a scorer that has not returned is
        abandoned (`abandoned` turns True): its callers get an error and its (daemon) thread is
        left to the process's exit."""
        await self._queue.put(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except asyncio.TimeoutError:
            self.abandoned = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            while not self._queue.empty():
                _fail([self._queue.get_nowait()], RuntimeError("reward server stopped"))
        self._thread.stop()

    async def _loop(self) -> None:
        carry: _Job | None = None  # a job that did not fit the last batch starts the next one
        while True:
            job = carry if carry is not None else await self._queue.get()
            carry = None
            if job is None:
                return
            jobs = [job]
            try:
                carry, stop = await self._gather(jobs)
                await self._score(jobs)
            except asyncio.CancelledError:  # close() gave up on a scorer that does not return
                _fail([*jobs, carry], RuntimeError("reward server stopped"))
                raise
            if stop:
                return

    async def _gather(self, jobs: list[_Job]) -> tuple[_Job | None, bool]:
        """Add queued jobs to `jobs` up to `max_batch_size` samples, waiting at most `max_wait_s`;
        returns (the job that did not fit, if any; whether close() was asked for)."""
        size = sum(len(j.prompts) for j in jobs)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch_size:
            try:
                nxt = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if nxt is None:
                return None, True
            if size + len(nxt.prompts) > self.max_batch_size:
                return nxt, False
            jobs.append(nxt)
            size += len(nxt.prompts)
        return None, False

    async def _call(self, prompts, responses, metadata, ids) -> list[float]:
        self.batches += 1
        if self.exporter is not None:
            self.exporter.batch_size.observe(len(prompts))
        future = self._thread.submit(self.model.score_sources, prompts, responses, metadata, ids)
        return (await asyncio.wrap_future(future)).tolist()  # one row of S source scores per sample

    async def _score(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # a caller whose deadline passed is gone
        if not jobs:
            return
        columns = [[x for j in jobs for x in getattr(j, f)] for f in ("prompts", "responses", "metadata", "ids")]
        try:
            values = await self._call(*columns)
        except Exception as err:  # noqa: BLE001 - isolated below: each caller gets its own outcome
            if len(jobs) == 1:
                await self._refuse(jobs[0], err)
            else:
                # One bad request must not fail the others, nor show them its ids: score each alone.
                for j in jobs:
                    await self._score_alone(j)
            return
        start = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(values[start : start + len(j.prompts)])
            start += len(j.prompts)

    async def _score_alone(self, job: _Job) -> None:
        if job.future.done():
            return
        try:
            values = await self._call(*job.rows(len(job.prompts)))
        except Exception as err:  # noqa: BLE001 - the error is this caller's alone
            await self._refuse(job, err)
            return
        if not job.future.done():
            job.future.set_result(values)

    async def _refuse(self, job: _Job, err: Exception) -> None:
        """Fail `job` (scored alone) with `err`, made to name the caller's bad sample.

        A RewardError already names it. A reward function's ValueError or KeyError is the caller's
        error (INVALID_ARGUMENT): the first failing sample is found by bisecting on prefixes of the
        request, each scored alone, and named. Anything else stays the server's error (INTERNAL).
        """
        if isinstance(err, CALLER_ERRORS) and not isinstance(err, RewardError):
            row = await self._first_bad_row(job)
            name = f"sample {job.ids[row]} (row {row})"
            err = RewardError(f"{name}: reward {self.model.name} failed: {type(err).__name__}: {err}")
        if not job.future.done():
            job.future.set_exception(err)

    async def _first_bad_row(self, job: _Job) -> int:
        """The row whose addition makes a prefix of the (failing) request fail: log2(n) scorer calls."""
        good, bad = 0, len(job.prompts)  # the first `good` rows score; the first `bad` rows fail
        while bad - good > 1:
            mid = (good + bad) // 2
            try:
                await self._call(*job.rows(mid))
            except Exception:  # noqa: BLE001 - a failing prefix: the bad row is in it
                bad = mid
            else:
                good = mid
        return bad - 1


def _fail(jobs: list[_Job], err: Exception) -> None:
    for j in jobs:
        if j is not None and not j.future.done():
            j.future.set_exception(err)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, batcher: DynamicBatcher, scorer_name: str, max_samples: int, reward: RewardConfig):
        self.batcher = batcher
        self.scorer_name = scorer_name
        self.max_samples = max_samples
        self.reward = reward  # how the sources combine
        self.names = [source_name(s) for s in reward_sources(reward)]

    async def Score(self, request, context):
        exporter, start = self.batcher.exporter, time.perf_counter()
        try:
            reply = await self._score(request, context)
        except BaseException:
            if exporter is not None:
                code = context.code() if hasattr(context, "code") else None
                exporter.requests.labels(getattr(code, "name", "CANCELLED")).inc()
            raise
        if exporter is not None:
            exporter.requests.labels("OK").inc()
            exporter.latency.observe(time.perf_counter() - start)
            exporter.samples.inc(len(request.samples))
        return reply

    async def _score(self, request, context):
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
            raw = await self.batcher.score(
                [s.prompt for s in request.samples],
                [s.response for s in request.samples],
                [dict(s.metadata) for s in request.samples],
                ids,
            )
            raw = torch.tensor(raw, dtype=torch.float32).reshape(len(ids), len(self.names))  # (B, S)
            scores = combine(raw, self.reward, ids).scores.tolist()
        except RewardError as err:
            error = (grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:  # noqa: BLE001 - the caller sees why, the server keeps serving
            error = (grpc.StatusCode.INTERNAL, f"reward {self.scorer_name} failed: {err}")
        if error is not None:
            await context.abort(*error)
        sources = [
            reward_pb2.SourceScores(name=name, scores=column)
            for name, column in zip(self.names, raw.T.tolist(), strict=True)
        ]
        return reward_pb2.ScoreResponse(
            request_id=request.request_id, scores=scores, scorer=self.scorer_name, sources=sources
        )


SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServer:
    """The reward core, a dynamic batcher and a grpc.aio server with health and reflection.
    `start` and `stop` run on the event loop that serves it."""

    def __init__(self, cfg: RewardServerConfig):
        self.cfg = cfg
        self.port: int | None = None
        self.metrics_port: int | None = None  # /metrics, when cfg.metrics_port is set
        self.batcher: DynamicBatcher | None = None

    async def start(self) -> int:
        """Load the reward, bind, serve; returns the bound port."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1.health import SERVICE_NAME as HEALTH_NAME
        from grpc_health.v1.health import aio as health_aio
        from grpc_reflection.v1alpha import reflection

        from keel.transport.security import add_servicer, make_aio_server

        cfg = self.cfg
        model = RewardModel(cfg.reward, cfg.grpc)
        self.batcher = DynamicBatcher(model, cfg.max_batch_size, cfg.max_wait_ms)
        if cfg.metrics_port is not None:
            from keel.telemetry.prometheus import RewardServerExporter

            self.batcher.exporter = RewardServerExporter(cfg.grpc.host, cfg.metrics_port)
            self.metrics_port = self.batcher.exporter.port
        self._server, self.port = make_aio_server(cfg.grpc, cfg.port, max_concurrency=cfg.max_concurrency)
        servicer = RewardServicer(self.batcher, model.name, cfg.max_request_samples, cfg.reward)
        add_servicer(self._server, reward_pb2.DESCRIPTOR.services_by_name["RewardService"], servicer)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME], self._server)
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.scorer = model.name
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING for new health checks, finish in-flight calls (up to grace_s), then stop.
        A scorer still running when grace_s is up is abandoned, so stopping never hangs on it."""
        deadline = time.monotonic() + grace_s
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        await self.batcher.close(max(0.0, deadline - time.monotonic()))
        if self.batcher.exporter is not None:
            self.batcher.exporter.close()

    async def serve_until_signal(self, on_ready=None) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully (what `keel serve reward` runs).

        When a scorer call outlived grace_s, the process exits here (os._exit) instead of returning:
        the call still runs on its thread, and interpreter teardown would wait behind it (or hang for
        good on one that holds the GIL), and the caller asked for an exit within grace_s.
        """
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
        if self.batcher.abandoned:
            print(f"a scorer call did not return within grace_s ({self.cfg.grace_s}s); exiting without it", flush=True)
            sys.stderr.flush()
            os._exit(0)


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
        """Stop serving (in-flight calls get `grace_s`); stopping a stopped server does nothing."""
        if self._loop.is_closed():
            return
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
