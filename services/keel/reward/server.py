"""`keel serve reward`: the reward core behind a gRPC RewardService, shareable by many jobs.

Requests from concurrent callers are batched dynamically: a scoring thread takes whatever is
queued, up to `max_batch_size` samples, waiting at most `max_wait_ms` for more, scores the
lot in one call, and hands each caller its slice. Concurrency is bounded by the server
(RESOURCE_EXHAUSTED past `max_concurrency` in-flight calls). SIGTERM marks the server
NOT_SERVING, lets in-flight requests finish, then exits.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

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
    max_batch_size: int = Field(64, ge=1, description="Most samples scored in one call.")
    max_wait_ms: float = Field(5.0, ge=0.0, description="How long a batch waits for more samples.")
    max_concurrency: int = Field(64, ge=1, description="In-flight calls; more are refused with RESOURCE_EXHAUSTED.")
    grace_s: float = Field(30.0, ge=0.0, description="On SIGTERM, time in-flight calls get to finish.")


@dataclass
class _Job:
    prompts: list[str]
    responses: list[str]
    metadata: list[dict[str, str]]
    ids: list[str]
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """Groups concurrent scoring jobs into batches of at most `max_batch_size` samples."""

    def __init__(self, model: RewardModel, max_batch_size: int, max_wait_ms: float):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batches = 0  # how many model calls were made (for tests and metrics)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompts, responses, metadata, ids) -> Future:
        job = _Job(prompts, responses, metadata, ids)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        carry: _Job | None = None  # a job that did not fit the last batch starts the next one
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                return
            jobs, size, stop = [job], len(job.prompts), False
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if size + len(nxt.prompts) > self.max_batch_size:
                    carry = nxt
                    break
                jobs.append(nxt)
                size += len(nxt.prompts)
            self._score(jobs)
            if stop:
                return

    def _score(self, jobs: list[_Job]) -> None:
        flat = [
            (p, r, m, i) for j in jobs for p, r, m, i in zip(j.prompts, j.responses, j.metadata, j.ids, strict=True)
        ]
        prompts, responses, metadata, ids = (list(x) for x in zip(*flat, strict=True))
        self.batches += 1
        try:
            scores = self.model.score(prompts, responses, metadata, ids).tolist()
        except Exception as err:  # noqa: BLE001 - every waiting caller gets the error
            for j in jobs:
                j.future.set_exception(err)
            return
        start = 0
        for j in jobs:
            j.future.set_result(scores[start : start + len(j.prompts)])
            start += len(j.prompts)


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, batcher: DynamicBatcher, scorer_name: str, max_samples: int):
        self.batcher = batcher
        self.scorer_name = scorer_name
        self.max_samples = max_samples

    def Score(self, request, context):
        if not request.samples:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "samples: empty request")
        if len(request.samples) > self.max_samples:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"samples: {len(request.samples)} exceeds max_batch_size {self.max_samples}",
            )
        # An empty response is legitimate (the policy stopped at once); the reward decides its worth.
        ids = [s.sample_id or str(i) for i, s in enumerate(request.samples)]
        future = self.batcher.submit(
            [s.prompt for s in request.samples],
            [s.response for s in request.samples],
            [dict(s.metadata) for s in request.samples],
            ids,
        )
        try:
            scores = future.result()
        except RewardError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception as err:  # noqa: BLE001 - the caller sees why, the server keeps serving
            context.abort(grpc.StatusCode.INTERNAL, f"reward {self.scorer_name} failed: {err}")
        return reward_pb2.ScoreResponse(request_id=request.request_id, scores=scores, scorer=self.scorer_name)


@dataclass
class RunningRewardServer:
    server: grpc.Server
    port: int
    batcher: DynamicBatcher
    health: object

    def stop(self, grace_s: float) -> None:
        """NOT_SERVING for new health checks, finish in-flight calls (up to grace_s), then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.batcher.close()


def start_reward_server(cfg: RewardServerConfig) -> RunningRewardServer:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from keel.transport.security import make_server

    model = RewardModel(cfg.reward)
    batcher = DynamicBatcher(model, cfg.max_batch_size, cfg.max_wait_ms)
    server, port = make_server(cfg.grpc, cfg.port, max_workers=cfg.max_concurrency, max_concurrency=cfg.max_concurrency)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(batcher, model.name, cfg.max_batch_size), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
    reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    server.start()
    for name in ("", service_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningRewardServer(server, port, batcher, health_servicer)
