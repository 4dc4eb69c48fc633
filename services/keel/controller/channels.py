"""The three channels of a step, each over the Ray object store or gRPC (`transport` config).

- rollout: prompts out to the workers, `Trajectories` back. objectstore: the actor call's
  return value. grpc: each worker pushes its batch to the controller's TrajectoryService
  (deduped by rollout id, stale versions refused) and the call returns only the rollout id.
- reward: scores for a batch. objectstore: the reward actors, on the batch's object ref. grpc:
  a `RewardClient` to each of the job's reward-server actors, or one to an external `keel serve
  reward`. With `reward.replicas` actors the batch is cut into contiguous shards, one per actor,
  scored concurrently and joined in order (`keel.controller.replicas`). What comes back is each
  source's raw scores, (B, S); the controller combines them (`keel.reward.combine`), since a
  source's whitening is over the whole batch. An external server's scores are one source.
- weights: the learner's new policy to every rollout worker. objectstore: one object fetched by
  every worker. grpc: the learner publishes the version on its WeightService; every worker
  fetches it in checksummed chunks and applies it all-or-nothing.

The choice is made once, in `open_channels`; `Controller.step` reads the same either way.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from keel.config import GrpcConfig, RunConfig, reward_sources, source_name
from keel.controller.replicas import Joined, shard
from keel.data.prompts import Prompt
from keel.trajectory import Trajectories


def grpc_token_env(cfg: RunConfig) -> dict[str, str]:
    """Env vars for the actors that serve or call gRPC to find the bearer token: never the token
    itself, which Ray would keep in its actor table (shown by the dashboard) with the runtime_env.

    An actor looks in its own environment (Ray workers inherit the raylet's: with a local
    `ray.init()` that is this driver's), then in the file handed over here, then in
    transport.grpc.token_file. The file: a token in this driver's environment written where only
    this user can read it, its path alone handed over (`hand_over_token`), so actors on this node
    find it even when Ray started without the token; other nodes need their own env or token_file.
    """
    from keel.transport.security import hand_over_token

    servers = any(s.type == "server" for s in reward_sources(cfg.reward))  # the reward actors call them
    if not ((cfg.transport.uses_grpc() or servers) and cfg.transport.grpc.auth):
        return {}
    return hand_over_token(cfg.transport.grpc)


# --------------------------------------------------------------------------- rollout


@dataclass
class InFlight:
    """A rollout launched on the workers and not collected yet."""

    prompts: list[Prompt]  # every prompt of the batch, in sampler order
    chunks: list[list[Prompt]]  # the share of each worker
    refs: list  # one ObjectRef per worker: its Trajectories, or (grpc) its rollout id
    ready: list[Trajectories] | None = None  # already collected (kept for a checkpoint, or restored from one)
    workers: list = field(default_factory=list)  # the actor each chunk went to (a replacement takes its place)
    seed: int = 0  # the launch seed; chunk i samples with seed + 101 i, wherever it runs
    launched: float = field(default_factory=time.perf_counter)  # when the workers got it


def launch_chunks(workers: list, prompts: list[Prompt], seed: int, dispatch) -> InFlight:
    """Split `prompts` over `workers` and start each chunk with `dispatch(worker, chunk, seed, i)`."""
    chunks = split(prompts, len(workers))
    refs = [dispatch(w, c, seed, i) for i, (w, c) in enumerate(zip(workers, chunks, strict=True))]
    return InFlight(prompts, chunks, refs, workers=list(workers), seed=seed)


class ObjectStoreRollout:
    """`workers` is the controller's own list: workers added or removed by scaling are seen here."""

    def __init__(self, workers: list):
        self.workers = workers

    def launch(self, prompts: list[Prompt], seed: int) -> InFlight:
        return launch_chunks(self.workers, prompts, seed, self.dispatch)

    @staticmethod
    def dispatch(worker, chunk: list[Prompt], seed: int, index: int):
        return worker.generate.remote(chunk, seed + index * 101)

    def result(self, flight: InFlight, index: int, ref, timeout_s: float) -> Trajectories:
        import ray

        return ray.get(ref, timeout=timeout_s)

    def advance(self, version: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


class GrpcRollout:
    """Workers push to this process's TrajectoryService; the batches are taken from its inbox."""

    def __init__(self, workers: list, grpc_cfg: GrpcConfig, max_staleness: int, vocab_size: int | None = None):
        from keel.transport.trajectories import TrajectoryInbox, TrajectoryServer

        self.workers = workers
        self.inbox = TrajectoryInbox(max_staleness)
        # token ids past the policy's vocabulary are refused at decode, naming the field
        self.server = TrajectoryServer(self.inbox, grpc_cfg, vocab_size)
        self.timeout_s = grpc_cfg.deadline_s

    def launch(self, prompts: list[Prompt], seed: int) -> InFlight:
        return launch_chunks(self.workers, prompts, seed, self.dispatch)

    @staticmethod
    def dispatch(worker, chunk: list[Prompt], seed: int, index: int):
        return worker.generate_and_push.remote(chunk, seed + index * 101)

    def result(self, flight: InFlight, index: int, ref, timeout_s: float) -> Trajectories:
        """The batch a chunk's worker pushed: its rollout id comes back as the call's result."""
        import ray

        [batch] = self.inbox.take([ray.get(ref, timeout=timeout_s)], self.timeout_s)
        return with_prompts(batch, flight.chunks[index])

    def advance(self, version: int) -> None:
        self.inbox.set_version(version)

    def metrics(self) -> dict[str, float]:
        s = self.inbox.stats
        return {"trajectories/duplicate": s.duplicate, "trajectories/stale": s.stale, "trajectories/ahead": s.ahead}


def split(prompts: list[Prompt], workers: int) -> list[list[Prompt]]:
    """Worker i gets prompts i, i + workers, ...: every prompt goes to exactly one worker."""
    return [prompts[i::workers] for i in range(workers)]


def with_prompts(traj: Trajectories, prompts: list[Prompt]) -> Trajectories:
    """The wire carries tokens and ids, not the prompt text and task fields the reward reads:
    restore them from the prompts that were sent."""
    by_id = {p.prompt_id: p for p in prompts}
    missing = sorted(set(traj.prompt_ids) - set(by_id))
    if missing:
        raise ValueError(f"batch {traj.rollout_id} answers prompts that were not sent: {missing[:3]}")
    chosen = [by_id[pid] for pid in traj.prompt_ids]
    return traj.with_fields(prompts=[p.text for p in chosen], metadata=[dict(p.metadata) for p in chosen])


# --------------------------------------------------------------------------- reward


class ActorReward:
    """The job's reward actors (RewardModel), each scoring its shard of the batch by every source,
    (b, S); a lost or hung actor is started again and its shard sent again (`StatelessRole`)."""

    def __init__(self, role):
        self.role = role  # StatelessRole

    def submit(self, traj: Trajectories, traj_ref, step: int | None) -> Joined:
        return self.role.submit(traj, traj_ref, "score_trajectories_by_source", step)

    def take_latencies(self) -> list[float]:
        """Seconds of each scoring call (a shard) answered since the last take."""
        return self.role.take_latencies()

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class GrpcReward:
    """Scores through RewardClients (one per reward server), each on its own thread, so scoring
    overlaps the reference and learner calls and the servers score their shards concurrently.

    A server that answers UNAVAILABLE or RESOURCE_EXHAUSTED (down, restarting, overloaded) is tried
    again with backoff for up to reward.outage_budget_s per call; the job's own servers (`actors`)
    are asked their address again each time, since Ray may have started one again on another port.
    Past the budget the call raises RoleOutage. Scores are checked (one finite number per sample and
    source, naming the first bad one): each source's raw scores from the job's own servers, (b, S),
    or an external server's scores as one source, (b, 1). The controller combines them.
    """

    def __init__(self, clients: list, reward_cfg, actors: list | None = None, log=print, errors=None):
        from keel.controller.errors import ErrorTally

        self.clients = clients
        self.errors = errors if errors is not None else ErrorTally()  # each unavailable try counts
        self.actors = actors or []  # RewardServerRole actors, one per client; none for an external server
        self.budget_s = reward_cfg.outage_budget_s
        # the names of the columns a server sends: the job's sources, or an external server's scores
        self.sources = [source_name(s) for s in reward_sources(reward_cfg)] if self.actors else None
        self.log = log
        self.outage_s = 0.0  # time spent waiting for a server, over the run
        self.redials = 0  # reconnections to a server found at a new address
        self.latencies: list[float] = []  # seconds of each answered call since the last take_latencies
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="reward-client")

    def submit(self, traj: Trajectories, traj_ref, step: int | None) -> Joined:
        parts = shard(traj, len(self.clients))
        return Joined([self._pool.submit(self._score, i, p, step) for i, p in enumerate(parts)])

    def _score(self, index: int, part: Trajectories, step: int | None):
        from keel.controller.supervisor import RoleOutage, at_step
        from keel.reward.client import RewardUnavailable
        from keel.reward.combine import check_sources

        start, delay, failed = time.monotonic(), 0.5, False
        while True:
            client = self.clients[index]
            try:
                called = time.perf_counter()
                raw = client.score_trajectories_by_source(part) if self.sources else client.score_trajectories(part)
                with self._lock:
                    self.latencies.append(time.perf_counter() - called)
                break
            except RewardUnavailable as err:
                failed = True
                waited = time.monotonic() - start
                if waited >= self.budget_s:
                    raise RoleOutage(
                        f"reward: server {client.address} unreachable for {waited:.0f}s {at_step(step)}, past "
                        f"reward.outage_budget_s ({self.budget_s:g}s): {err}",
                        "reward",
                        "outage",
                    ) from None
                self.errors.add("reward", "unavailable")
                self.log(f"{err} ({at_step(step)}); trying again ({waited:.0f}s so far)")
                time.sleep(min(delay, max(0.0, self.budget_s - waited)) * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)
                self._redial(index, self.budget_s - (time.monotonic() - start))
        if failed:
            with self._lock:
                self.outage_s += time.monotonic() - start
        server = f"server {self.clients[index].address}"
        if self.sources is None:  # an external server: its scores are the one source
            raw, names = raw[:, None], [server]
        else:
            names = [f"{n} ({server})" for n in self.sources]
        check_sources(raw, names, part.sample_ids)
        return raw

    def _redial(self, index: int, left_s: float) -> None:
        """A job-owned server: ask its actor where it listens now (Ray starts a lost one again, on a
        new port unless transport.grpc.reward_port is set) and reconnect when that changed."""
        import ray

        from keel.reward.client import RewardClient

        if not self.actors or left_s <= 0:
            return
        try:
            address = ray.get(self.actors[index].address.remote(), timeout=max(1.0, left_s))
        except Exception:  # still starting again: the next attempt asks again
            return
        old = self.clients[index]
        if address != old.address:
            self.clients[index] = RewardClient(old.cfg, address, old.base_delay_s)
            old.close()
            with self._lock:
                self.redials += 1
            self.log(f"reward server now at {address} (was {old.address})")

    def take_latencies(self) -> list[float]:
        """Seconds of each answered scoring call (a shard) since the last take."""
        with self._lock:
            out, self.latencies = self.latencies, []
        return out

    def metrics(self) -> dict[str, float]:
        return {"reward/outage_s": self.outage_s, "reward/redials": float(self.redials)}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for client in self.clients:
            client.close()


# --------------------------------------------------------------------------- weights


class ObjectStoreWeights:
    """Weights from learner rank 0 to the rollout workers without gRPC. A worker on rank 0's node
    maps them from the learner's shared-memory buffer (`keel.transport.shm`: one write, one read);
    a worker on another node gets them through the Ray object store, put once as numpy arrays
    (`keel.transport.objectstore`)."""

    def __init__(self):
        self.latest = None  # SharedHandle of the last published weights, kept for workers added later
        self.learners: list = []
        self._packed = None  # ObjectRef of the last version in the object store, made when first needed

    def publish(
        self, learners: list, workers: list, version: int, timeout_s: float, step: int | None = None
    ) -> tuple[dict[str, float], list]:
        """Weights `version` to every worker: (metrics, each worker's answer as `settle` gives it).
        A learner rank that is lost or gives no answer raises RoleFailed."""
        from keel.controller.supervisor import gather

        # every rank takes part (a collective under ZeRO-3); rank 0 writes its shared buffer
        ranks = [(f"learner rank {r}", lr.export_shared.remote(version)) for r, lr in enumerate(learners)]
        self.latest = gather(ranks, "weight export", step, timeout_s, "controller.weight_sync_timeout_s")[0]
        self.learners, self._packed = learners, None
        answers = self._apply(workers, version, timeout_s, step)
        return {"weight_sync/bytes": float(self.latest.total_bytes)}, answers

    def _apply(self, workers: list, version: int, timeout_s: float, step: int | None) -> list:
        """`latest` to `workers`: mapped on rank 0's node, through the object store elsewhere; returns
        each worker's answer (`settle`)."""
        answers = settle(workers, [w.update_weights_shared.remote(self.latest, version) for w in workers], timeout_s)
        elsewhere = [i for i, answer in enumerate(answers) if answer is None]  # not on rank 0's node
        if elsewhere:
            packed = self._packed_ref(step, timeout_s)
            calls = [workers[i].update_weights.remote(packed, version) for i in elsewhere]
            for i, answer in zip(elsewhere, settle([workers[i] for i in elsewhere], calls, timeout_s), strict=True):
                answers[i] = answer
        return answers

    def _packed_ref(self, step: int | None, timeout_s: float):
        """The last version in the object store (every rank takes part in the export), made once."""
        from keel.controller.supervisor import gather

        if self._packed is None:
            exports = [lr.export_packed_weights.remote() for lr in self.learners]
            ranks = [(f"learner rank {r}", ref) for r, ref in enumerate(exports)]
            gather(ranks, "weight export", step, timeout_s, "controller.weight_sync_timeout_s")
            self._packed = exports[0]
        return self._packed

    def catch_up(self, worker, version: int, timeout_s: float) -> None:
        """Bring a new worker to the current version before it gets prompts."""
        import ray

        if version == 0:
            return
        mapped = ray.get(worker.update_weights_shared.remote(self.latest, version), timeout=timeout_s)
        if mapped is None:  # on another node than learner rank 0
            ray.get(worker.update_weights.remote(self._packed_ref(None, timeout_s), version), timeout=timeout_s)


class GrpcWeights:
    def publish(
        self, learners: list, workers: list, version: int, timeout_s: float, step: int | None = None
    ) -> tuple[dict[str, float], list]:
        """Weights `version` to every worker: (metrics, each worker's answer as `settle` gives it).
        A learner rank that is lost or gives no answer raises RoleFailed."""
        from keel.controller.supervisor import gather

        ranks = [(f"learner rank {r}", lr.publish_weights.remote(version)) for r, lr in enumerate(learners)]
        published = gather(ranks, "weight publish", step, timeout_s, "controller.weight_sync_timeout_s")[0]
        answers = settle(workers, [w.pull_weights.remote(version) for w in workers], timeout_s)
        return {"weight_sync/bytes": float(published["bytes"])}, answers

    def catch_up(self, worker, version: int, timeout_s: float) -> None:
        """Bring a new worker to the current version (the WeightService still holds it)."""
        import ray

        if version > 0:
            ray.get(worker.pull_weights.remote(version), timeout=timeout_s)


def settle(workers: list, refs: list, timeout_s: float) -> list:
    """Wait for one call per worker; returns each worker's answer in order: the call's result, or
    "lost" / "timeout" for a worker that is gone or gave no answer within `timeout_s` (the
    supervisor replaces those). Any other error raises."""
    import ray

    from keel.controller.supervisor import actor_lost

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers = []
    for ref in refs:
        if ref not in ready:
            answers.append("timeout")
            continue
        try:
            answers.append(ray.get(ref))
        except Exception as err:
            if not actor_lost(err):
                raise
            answers.append("lost")
    return answers


# --------------------------------------------------------------------------- all three


@dataclass
class Channels:
    rollout: ObjectStoreRollout | GrpcRollout
    reward: ActorReward | GrpcReward
    weights: ObjectStoreWeights | GrpcWeights
    addresses: dict[str, str] = field(default_factory=dict)  # gRPC endpoints, for the log
    connect_timeout_s: float = 600.0  # controller.start_timeout_s: a worker's connect call

    def close(self) -> None:
        self.reward.close()
        if isinstance(self.rollout, GrpcRollout):
            self.rollout.server.stop(0)

    def connect(self, worker, grpc_cfg: GrpcConfig) -> None:
        """Point a (new) worker at the job's WeightService and TrajectoryService, when they are on gRPC."""
        import ray

        if "weights" in self.addresses or "trajectories" in self.addresses:
            call = worker.connect.remote(grpc_cfg, self.addresses.get("weights"), self.addresses.get("trajectories"))
            ray.get(call, timeout=self.connect_timeout_s)

    def metrics(self) -> dict[str, float]:
        return {**self.rollout.metrics(), **self.reward.metrics()}


def open_channels(cfg: RunConfig, workers: list, learners: list, reward_role, log=print, errors=None) -> Channels:
    """Start the gRPC endpoints the config asks for and connect the workers to them. `reward_role` is
    the job's reward actors (a StatelessRole; None with an external reward server); `errors` the
    run's ErrorTally. Every wait is bounded by controller.start_timeout_s."""
    from keel.controller.supervisor import gather

    t, grpc_cfg = cfg.transport, cfg.transport.grpc
    timeout_s, setting = cfg.controller.start_timeout_s, "controller.start_timeout_s"
    addresses: dict[str, str] = {}

    rollout = ObjectStoreRollout(workers)
    if t.trajectories == "grpc":
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(cfg.model.policy, trust_remote_code=cfg.model.trust_remote_code).vocab_size
        rollout = GrpcRollout(workers, grpc_cfg, cfg.controller.max_staleness, vocab)
        addresses["trajectories"] = rollout.server.address

    weights = ObjectStoreWeights()
    if t.weights == "grpc":
        weights = GrpcWeights()
        [addresses["weights"]] = gather(
            [("learner rank 0", learners[0].serve_weights.remote(grpc_cfg))], "serve weights", None, timeout_s, setting
        )
    reward_actors = reward_role.actors if reward_role is not None else []
    reward = ActorReward(reward_role)
    if t.reward == "grpc":
        from keel.reward.client import RewardClient

        external = [grpc_cfg.reward_address] if grpc_cfg.reward_address else []
        asked = [(f"reward actor {i}", a.address.remote()) for i, a in enumerate(reward_actors)]
        servers = external or gather(asked, "address", None, timeout_s, setting)
        addresses["reward"] = ", ".join(servers)
        clients = [RewardClient(grpc_cfg, address) for address in servers]
        for client in clients:
            client.wait_ready()
        reward = GrpcReward(clients, cfg.reward, reward_actors, log, errors)
    channels = Channels(rollout, reward, weights, addresses, timeout_s)
    for w in workers:
        channels.connect(w, grpc_cfg)
    return channels
