"""TrajectoryService: rollout workers push `Trajectories` to the learner side over gRPC.

The learner side keeps a `TrajectoryInbox`. It accepts a batch once per rollout id. It refuses
a batch whose weight version is more than `max_staleness` behind the learner, or ahead of it,
or one that would take the inbox past `transport.grpc.trajectory_inbox_mb`, and the ack says
why. A malformed batch (bad shapes, wrong dtype, lengths that disagree, no samples, token ids
outside the vocabulary, non-finite log-probs) ends the stream with INVALID_ARGUMENT naming the
batch and the field.

`Pull` (an outside consumer taking batches) is off unless `transport.grpc.trajectory_pull_streams`
is set; Pull streams then have their own threads, at most that many at once, each waiting at most
`deadline_s`, so pullers cannot starve `Push` of the server's threads.

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
from keel.transport.security import GrpcClient, add_servicer, serve

DUPLICATE = "duplicate"
PUSH_THREADS = 8  # server threads for Push (and quick refusals); Pull streams get their own on top
SERVICE = trajectory_pb2.DESCRIPTOR.services_by_name["TrajectoryService"]


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
    full: int = 0  # refused: the inbox held too many bytes
    dropped: int = 0  # accepted, then too old by the time a consumer pulled


def held_bytes(traj: Trajectories) -> int:
    """Roughly what a queued batch holds in memory: its tensors' bytes and its texts' characters."""
    tensors = (traj.prompt_tokens, traj.prompt_mask, traj.response_tokens, traj.response_mask, traj.behaviour_logprobs)
    texts = (*traj.prompt_ids, *traj.prompts, *traj.responses)
    return sum(t.numel() * t.element_size() for t in tensors) + sum(len(s) for s in texts)


class TrajectoryInbox:
    """Accepted batches waiting for the learner, in arrival order. Thread-safe."""

    def __init__(self, max_staleness: int = 0, remember: int = 1_000_000):
        self.max_staleness = max_staleness
        self.version = 0  # the learner's current weight version
        self.stats = InboxStats()
        self._remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()  # rollout ids ever accepted (bounded)
        self._queue: deque[Trajectories] = deque()
        self._bytes = 0  # held_bytes of what is queued
        self._cond = threading.Condition()

    def set_version(self, version: int) -> None:
        with self._cond:
            self.version = version

    def offer(self, traj: Trajectories, max_bytes: int | None = None) -> tuple[bool, str]:
        """(accepted, reason): a new, fresh batch is queued if the inbox then holds at most
        `max_bytes` (None = no bound); the reason says why one was not."""
        v = traj.weight_version
        size = held_bytes(traj)
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
            if max_bytes is not None and self._bytes + size > max_bytes:
                # Not remembered as seen: the same batch may be pushed again once the learner took some.
                self.stats.full += 1
                return False, f"full: {self._bytes} bytes queued, this batch {size}, bound {max_bytes}"
            self._seen[traj.rollout_id] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            self._queue.append(traj)
            self._bytes += size
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
                    self._bytes -= sum(held_bytes(t) for t in have.values())
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
                    self._bytes -= held_bytes(traj)
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
    """Push into `inbox`, decoding against `vocab_size` (None: ids are only checked >= 0) and
    bounded by `cfg.trajectory_inbox_mb`; Pull as `cfg.trajectory_pull_streams` allows."""

    def __init__(self, inbox: TrajectoryInbox, cfg: GrpcConfig | None = None, vocab_size: int | None = None):
        cfg = cfg or GrpcConfig()
        self.inbox = inbox
        self.vocab_size = vocab_size
        self.max_bytes = int(cfg.trajectory_inbox_mb * 2**20)
        self.pull_streams = cfg.trajectory_pull_streams
        self.max_pull_wait_s = cfg.deadline_s
        self._pull_slots = threading.Semaphore(self.pull_streams)

    def Push(self, request_iterator, context):
        for msg in request_iterator:
            try:
                traj = trajectories_from_proto(msg, vocab_size=self.vocab_size)
            except DecodeError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {msg.rollout_id or '(no rollout_id)'}: {err}")
            accepted, reason = self.inbox.offer(traj, self.max_bytes)
            yield trajectory_pb2.PushAck(
                rollout_id=traj.rollout_id, accepted=accepted, reason=reason, learner_version=self.inbox.version
            )

    def Pull(self, request, context):
        if not self.pull_streams:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "Pull is off on this server (transport.grpc.trajectory_pull_streams: 0)"
            )
        if request.max_batches < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_batches: must be >= 1, got {request.max_batches}")
        if request.wait_ms < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"wait_ms: must be >= 0, got {request.wait_ms}")
        if not self._pull_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Pull: {self.pull_streams} streams already open (transport.grpc.trajectory_pull_streams)",
            )
        try:  # the slot is held while the batches go out too: a consumer that reads slowly keeps it
            wait_s = min(request.wait_ms / 1000.0, self.max_pull_wait_s)
            for traj in self.inbox.pull(request.max_batches, request.min_version, wait_s):
                yield trajectories_to_proto(traj)
        finally:
            self._pull_slots.release()


class TrajectoryServer:
    """A TrajectoryService (with health) over an inbox, served from this process. Pass the policy's
    `vocab_size` so that pushed token ids are checked against it."""

    def __init__(self, inbox: TrajectoryInbox, cfg: GrpcConfig, vocab_size: int | None = None):
        self.inbox = inbox
        servicer = TrajectoryServicer(inbox, cfg, vocab_size)
        self._server, self.port, self.address = serve(
            cfg,
            cfg.trajectory_port,
            lambda server: add_servicer(server, SERVICE, servicer),
            max_workers=PUSH_THREADS + cfg.trajectory_pull_streams,
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
