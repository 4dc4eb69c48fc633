"""The three channels of a step, each over the Ray object store or gRPC (`transport` config).

- rollout: prompts out to the workers, `Trajectories` back. objectstore: the actor call's
  return value. grpc: each worker pushes its batch to the controller's TrajectoryService
  (deduped by rollout id, stale versions refused) and the call returns only the rollout id.
- reward: scores for a batch. objectstore: the reward actors, on the batch's object ref. grpc:
  a `RewardClient` to each of the job's reward-server actors, or one to an external `keel serve
  reward`. With `reward.replicas` actors the batch is cut into contiguous shards, one per actor,
  scored concurrently and joined in order (`keel.controller.replicas`).
- weights: the learner's new policy to every rollout worker. objectstore: one object fetched by
  every worker. grpc: the learner publishes the version on its WeightService; every worker
  fetches it in checksummed chunks and applies it all-or-nothing.

The choice is made once, in `open_channels`; `Controller.step` reads the same either way.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from keel.config import GrpcConfig, RunConfig
from keel.controller.replicas import Joined, on_shards, shard
from keel.data.prompts import Prompt
from keel.trajectory import Trajectories


def grpc_token_env(cfg: RunConfig) -> dict[str, str]:
    """The bearer token, for the environment of actors that serve or call gRPC.

    Only a token the driver holds in its environment is passed on; a token file is read by each
    actor itself (mount it on every node), so it never lands in Ray's runtime_env.
    """
    grpc_cfg = cfg.transport.grpc
    if not (cfg.transport.uses_grpc() and grpc_cfg.auth):
        return {}
    token = os.environ.get(grpc_cfg.token_env, "").strip()
    return {grpc_cfg.token_env: token} if token else {}


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
    """The reward actors (RewardModel), each scoring its shard of the batch."""

    def __init__(self, actors: list):
        self.actors = actors

    def submit(self, traj: Trajectories, traj_ref) -> Joined:
        return on_shards(self.actors, traj, traj_ref, lambda actor, part: actor.score_trajectories.remote(part))

    def close(self) -> None:
        pass


class GrpcReward:
    """Scores through RewardClients (one per reward server), each on its own thread, so scoring
    overlaps the reference and learner calls and the servers score their shards concurrently."""

    def __init__(self, clients: list):
        self.clients = clients
        self._pool = ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="reward-client")

    def submit(self, traj: Trajectories, traj_ref) -> Joined:
        parts = shard(traj, len(self.clients))
        return Joined([self._pool.submit(c.score_trajectories, p) for c, p in zip(self.clients, parts, strict=False)])

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for client in self.clients:
            client.close()


# --------------------------------------------------------------------------- weights


class ObjectStoreWeights:
    def __init__(self):
        self.latest = None  # ObjectRef of the last published weights, kept for workers added later

    def publish(self, learners: list, workers: list, version: int, timeout_s: float) -> tuple[dict[str, float], list]:
        """Weights `version` to every worker: (metrics, the workers that are gone or did not answer)."""
        import ray

        # every rank takes part (a collective under ZeRO-3); rank 0's copy goes to the store once
        exports = [lr.export_weights.remote() for lr in learners]
        self.latest = exports[0]
        updates = [w.update_weights.remote(exports[0], version) for w in workers]
        ray.get(exports, timeout=timeout_s)
        return {}, settle(workers, updates, timeout_s)

    def catch_up(self, worker, version: int, timeout_s: float) -> None:
        """Bring a new worker to the current version before it gets prompts."""
        import ray

        if version > 0:
            ray.get(worker.update_weights.remote(self.latest, version), timeout=timeout_s)


class GrpcWeights:
    def publish(self, learners: list, workers: list, version: int, timeout_s: float) -> tuple[dict[str, float], list]:
        """Weights `version` to every worker: (metrics, the workers that are gone or did not answer)."""
        import ray

        published = ray.get([lr.publish_weights.remote(version) for lr in learners], timeout=timeout_s)[0]
        lost = settle(workers, [w.pull_weights.remote(version) for w in workers], timeout_s)
        return {"weight_sync/bytes": float(published["bytes"])}, lost


def settle(workers: list, refs: list, timeout_s: float) -> list:
    """Wait for one call per worker; returns the workers that are gone or gave no answer within
    `timeout_s` (the supervisor replaces them). Any other error raises."""
    import ray

    from keel.controller.supervisor import actor_lost

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    lost = []
    for worker, ref in zip(workers, refs, strict=True):
        if ref not in ready:
            lost.append(worker)
            continue
        try:
            ray.get(ref)
        except Exception as err:
            if not actor_lost(err):
                raise
            lost.append(worker)
    return lost

    def catch_up(self, worker, version: int, timeout_s: float) -> None:
        import ray

        if version > 0:  # the WeightService still holds the current version
            ray.get(worker.pull_weights.remote(version), timeout=timeout_s)


# --------------------------------------------------------------------------- all three


@dataclass
class Channels:
    rollout: ObjectStoreRollout | GrpcRollout
    reward: ActorReward | GrpcReward
    weights: ObjectStoreWeights | GrpcWeights
    addresses: dict[str, str] = field(default_factory=dict)  # gRPC endpoints, for the log

    def close(self) -> None:
        self.reward.close()
        if isinstance(self.rollout, GrpcRollout):
            self.rollout.server.stop(0)

    def connect(self, worker, grpc_cfg: GrpcConfig) -> None:
        """Point a (new) worker at the job's WeightService and TrajectoryService, when they are on gRPC."""
        import ray

        if "weights" in self.addresses or "trajectories" in self.addresses:
            ray.get(worker.connect.remote(grpc_cfg, self.addresses.get("weights"), self.addresses.get("trajectories")))


def open_channels(cfg: RunConfig, workers: list, learners: list, reward_actors: list) -> Channels:
    """Start the gRPC endpoints the config asks for and connect the workers to them. `reward_actors`
    are the job's reward actors (none with an external reward server)."""
    import ray

    t, grpc_cfg = cfg.transport, cfg.transport.grpc
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
        addresses["weights"] = ray.get(learners[0].serve_weights.remote(grpc_cfg))
    reward = ActorReward(reward_actors)
    if t.reward == "grpc":
        from keel.reward.client import RewardClient

        external = [grpc_cfg.reward_address] if grpc_cfg.reward_address else []
        servers = external or ray.get([a.address.remote() for a in reward_actors])
        addresses["reward"] = ", ".join(servers)
        clients = [RewardClient(grpc_cfg, address) for address in servers]
        for client in clients:
            client.wait_ready()
        reward = GrpcReward(clients)
    channels = Channels(rollout, reward, weights, addresses)
    for w in workers:
        channels.connect(w, grpc_cfg)
    return channels
