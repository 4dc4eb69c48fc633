"""TrajectoryService: rollout workers push `Trajectories` to the learner side over gRPC.

The learner side keeps a `TrajectoryInbox`. It accepts a batch once per rollout id. It refuses
a batch whose weight version is more than `max_staleness` behind the learner, or ahead of it,
and the ack says why. A malformed batch (bad shapes, wrong dtype, lengths that disagree) ends
the stream with INVALID_ARGUMENT naming the batch and the field.

`TrajectoryPusher` is the worker side. It sends batches on one Push stream and retries the
unacknowledged ones on UNAVAILABLE. A re-sent batch that the inbox already holds comes back
"duplicate", and the pusher counts it as delivered: dedupe makes the retries safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import grpc

from keel.config import GrpcConfig
from keel.trajectory import Trajectories
from keel.transport.codec import DecodeError, trajectories_from_proto, trajectories_to_proto
from keel.transport.pb import trajectory_pb2, trajectory_pb2_grpc
from keel.transport.retry import Unavailable, call_with_retries
from keel.transport.security import GrpcClient, serve

DUPLICATE = "duplicate"


class TrajectoryRejected(RuntimeError):
    """The learner side refused a pushed batch (stale, ahead, duplicate); the text says why."""


class TrajectoryPushError(RuntimeError):
    """A push the TrajectoryService answered with an error status (bad token, malformed batch)."""


@dataclass
class InboxStats:
    accepted: int = 0
    duplicate: int = 0
    stale: int = 0
    ahead: int = 0
    dropped: int = 0  # accepted, then too old by the time a consumer pulled


class TrajectoryInbox:
    """Accepted batches waiting for the learner, in arrival order. Thread-safe."""

    def __init__(self, max_staleness: int = 0, remember: int = 1_000_000):
        self.max_staleness = max_staleness
        self.version = 0  # the learner's current weight version
        self.stats = InboxStats()
        self._remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()  # rollout ids ever accepted (bounded)
        self._queue: deque[Trajectories] = deque()
        self._cond = threading.Condition()

    def set_version(self, version: int) -> None:
        with self._cond:
            self.version = version

    def offer(self, traj: Trajectories) -> tuple[bool, str]:
        """(accepted, reason): a new, fresh batch is queued; the reason says why one was not."""
        v = traj.weight_version
        with self._cond:
            if traj.rollout_id in self._seen:
                self.stats.duplicate += 1
                return False, DUPLICATE
            if v < self.version - self.max_staleness:
                self.stats.stale += 1
                return False, f"stale: version {v} < {self.version} - {self.max_staleness}"
            if v > self.version:
                self.stats.ahead += 1
                return False, f"ahead: version {v} > learner version {self.version}"
            self._seen[traj.rollout_id] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            self._queue.append(traj)
            self.stats.accepted += 1
            self._cond.notify_all()
            return True, ""

    def take(self, rollout_ids: list[str], timeout_s: float) -> list[Trajectories]:
        """Remove and return exactly these batches, in the order asked; wait up to timeout_s for them."""
        wanted = set(rollout_ids)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                have = {t.rollout_id: t for t in self._queue if t.rollout_id in wanted}
                if len(have) == len(wanted):
                    self._queue = deque(t for t in self._queue if t.rollout_id not in wanted)
                    return [have[r] for r in rollout_ids]
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(wanted - set(have))
                    raise TimeoutError(f"trajectories {missing} did not arrive within {timeout_s:.0f}s")
                self._cond.wait(left)

    def pull(self, max_batches: int, min_version: int = 0, wait_s: float = 0.0) -> list[Trajectories]:
        """Up to max_batches of the oldest batches; ones older than min_version are dropped (counted).
        Waits up to wait_s for the first batch."""
        deadline = time.monotonic() + wait_s
        out: list[Trajectories] = []
        with self._cond:
            while True:
                while self._queue and len(out) < max_batches:
                    traj = self._queue.popleft()
                    if traj.weight_version < min_version:
                        self.stats.dropped += 1
                    else:
                        out.append(traj)
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                self._cond.wait(left)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)


class TrajectoryServicer(trajectory_pb2_grpc.TrajectoryServiceServicer):
    def __init__(self, inbox: TrajectoryInbox):
        self.inbox = inbox

    def Push(self, request_iterator, context):
        for msg in request_iterator:
            try:
                traj = trajectories_from_proto(msg)
            except DecodeError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {msg.rollout_id or '(no rollout_id)'}: {err}")
            accepted, reason = self.inbox.offer(traj)
            yield trajectory_pb2.PushAck(
                rollout_id=traj.rollout_id, accepted=accepted, reason=reason, learner_version=self.inbox.version
            )

    def Pull(self, request, context):
        if request.max_batches < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_batches: must be >= 1, got {request.max_batches}")
        if request.wait_ms < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_ms: must be >= 0, got {request.wait_ms}")
        for traj in self.inbox.pull(request.max_batches, request.min_version, request.wait_ms / 1000.0):
            yield trajectories_to_proto(traj)


class TrajectoryServer:
    """A TrajectoryService (with health) over an inbox, served from this process."""

    def __init__(self, inbox: TrajectoryInbox, cfg: GrpcConfig):
        self.inbox = inbox
        servicer = TrajectoryServicer(inbox)
        self._server, self.port, self.address = serve(
            cfg,
            cfg.trajectory_port,
            lambda server: trajectory_pb2_grpc.add_TrajectoryServiceServicer_to_server(servicer, server),
        )

    def stop(self, grace_s: float | None = None) -> None:
        self._server.stop(grace_s)


class TrajectoryPusher(GrpcClient):
    """Pushes batches to a TrajectoryService; retries what was not acknowledged on UNAVAILABLE."""

    def __init__(self, cfg: GrpcConfig, address: str, worker_id: str = "", base_delay_s: float = 0.1):
        super().__init__(cfg, address, trajectory_pb2_grpc.TrajectoryServiceStub, base_delay_s)
        self.worker_id = worker_id

    def push(self, batches: list[Trajectories]) -> list[trajectory_pb2.PushAck]:
        """Push every batch; returns one ack per batch, in order. Raises Unavailable after the budget."""
        created = int(time.time() * 1000)
        messages = {b.rollout_id: trajectories_to_proto(b, self.worker_id, created) for b in batches}
        acks: dict[str, trajectory_pb2.PushAck] = {}
        attempts = 0

        def attempt():
            nonlocal attempts
            attempts += 1
            pending = [m for rid, m in messages.items() if rid not in acks]
            replies = self._stub.Push(iter(pending), timeout=self.cfg.deadline_s, metadata=self._metadata)
            for ack in replies:
                if attempts > 1 and ack.reason == DUPLICATE:
                    # delivered by an earlier attempt whose ack was lost
                    ack = trajectory_pb2.PushAck(
                        rollout_id=ack.rollout_id,
                        accepted=True,
                        reason="delivered by an earlier attempt",
                        learner_version=ack.learner_version,
                    )
                acks[ack.rollout_id] = ack

        try:
            call_with_retries(
                attempt, self.cfg.retries, f"trajectory service {self.address}", self.base_delay_s, Unavailable
            )
        except grpc.RpcError as err:
            raise TrajectoryPushError(
                f"trajectory service {self.address}: {err.code().name}: {err.details()}"
            ) from None
        return [acks[b.rollout_id] for b in batches]
