"""The role actors' lifecycle: placement, start, deadlines, restarts, and the re-dispatch of a lost
rollout worker's prompts. The loop (`keel.controller.loop`) only sequences a step; every actor it
calls was started here, and every wait it makes has a deadline from config that names the role
and the step when it fires.

Per role, what a loss costs:
- rollout worker: a rollout is launched as one chunk of prompts per worker, each with its own seed
  (the launch seed + 101 x chunk index). `Supervisor.collect` waits for every chunk up to
  `controller.rollout_timeout_s`. A chunk whose worker died (killed, OOM, node gone) or did not
  answer in time is re-dispatched: the worker is killed, a new one takes its place in the same
  placement bundle, loads the current weights, and generates the same chunk with the same seed, so
  every prompt is trained exactly once and the samples are those the lost worker would have made
  (given the same weights). Replacements are counted (`rollout/restarts`).
- reward and reference actors (`StatelessRole`): frozen models, no state. Ray starts a lost one
  again in its bundle; a call that found its actor lost, or had no answer within
  `controller.score_timeout_s` (the actor is then killed and started again), is sent again
  (`reward/restarts`, `reference/restarts`).
- learner ranks: a DeepSpeed process group cannot take a new member, so a lost rank (or one with
  no answer within its deadline) raises `RoleFailed`; with `controller.max_restarts` the run is
  started again from its latest checkpoint (`keel.controller.restarts`).

A call that fails `max_attempts` times raises `RoleFailed`, naming the role and the step.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from keel.config import RunConfig, reference_on_learner
from keel.controller.actors import remote, role_threads, thread_env
from keel.controller.errors import ErrorTally, role_of
from keel.controller.learner_reference import LearnerReference
from keel.controller.placement import in_group, node_cpus, place_roles, rendezvous, role_requests
from keel.controller.replicas import Joined, shard, start_references, start_rewards
from keel.controller.rollout_pool import RolloutPool
from keel.trajectory import Trajectories


class RoleError(RuntimeError):
    """An error that ends the controller, with the role and the kind of error it counts as
    (`keel.controller.errors`)."""

    def __init__(self, message: str, role: str = "run", kind: str = "exhausted"):
        super().__init__(message)
        self.role = role
        self.kind = kind


class RoleFailed(RoleError):
    """A role that did not recover within its budget: names the role and the step. The run can
    start again from its latest checkpoint (controller.max_restarts)."""


class RoleOutage(RoleError):
    """A service the run depends on (the reward server) stayed unreachable past its budget: the run
    stops at the step boundary with a checkpoint, and can be resumed once the service is back."""


def actor_lost(err: BaseException) -> bool:
    """Whether a Ray error means the actor is gone (died, killed, its node lost) rather than that
    the call raised an ordinary exception."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError | WorkerCrashedError)


def at_step(step: int | None) -> str:
    return "at start" if step is None else f"at step {step}"


def gather(calls: list[tuple[str, object]], what: str, step: int | None, timeout_s: float | None, setting: str) -> list:
    """The results of `calls`, (who, ObjectRef) pairs, in order. `who` names the role and rank
    ("learner rank 1"). A lost actor raises RoleFailed at once (the others may be waiting on it in
    a collective); no answer from all within `timeout_s` raises RoleFailed naming who did not answer,
    `what`, the step and the config `setting` (None: no deadline, for a call that is a whole
    training run). Another error propagates, unless a lost peer that explains it shows up within a
    few seconds."""
    import ray

    who = {ref: name for name, ref in calls}
    pending = [ref for _, ref in calls]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
        if not ready:
            late = ", ".join(who[r] for r in pending)
            raise RoleFailed(
                f"{late}: {what} {at_step(step)} gave no answer within {setting} ({timeout_s:g}s)",
                role_of(who[pending[0]]),
                "timeout",
            )
        for ref in ready:
            err = _error_unless_lost(ref, who[ref], what, step)
            if err is not None:
                # a collective's survivor fails when a peer dies: a lost peer is the error to report
                peers, _ = ray.wait(pending, num_returns=len(pending), timeout=5.0) if pending else ([], [])
                for peer in peers:
                    _error_unless_lost(peer, who[peer], what, step)
                raise err
    return ray.get([ref for _, ref in calls])


def _error_unless_lost(ref, who: str, what: str, step: int | None) -> Exception | None:
    """The error a finished call ended with (None: it succeeded); RoleFailed when its actor is lost."""
    import ray

    try:
        ray.get(ref)
    except Exception as err:
        if actor_lost(err):
            message = f"{who}: lost during {what} {at_step(step)} ({type(err).__name__})"
            raise RoleFailed(message, role_of(who), "lost") from err
        return err
    return None


class StatelessRole:
    """Actors of a role with no state of their own (reward, reference), each taking a shard of a
    batch. Ray starts a lost actor again (they are created with max_restarts); a call that finds
    its actor lost or gets no answer in time is sent again once the actor is back."""

    def __init__(
        self, name: str, actors: list, cfg, max_attempts: int = 3, log=print, errors: ErrorTally | None = None
    ):
        self.name = name  # "reward", "reference"
        self.actors = actors
        self.errors = errors if errors is not None else ErrorTally()
        self.timeout_s = cfg.score_timeout_s
        self.start_timeout_s = cfg.start_timeout_s
        self.max_attempts = max_attempts
        self.log = log
        self.restarts = 0
        self.latencies: list[float] = []  # seconds of each answered call since the last take_latencies
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(actors)), thread_name_prefix=name)

    def call(self, index: int, method: str, arg, step: int | None):
        """`actors[index].method(arg)`, sent again after a loss or a missed deadline."""
        import ray
        from ray.exceptions import GetTimeoutError

        actor = self.actors[index]
        for attempt in range(1, self.max_attempts + 1):
            start = time.perf_counter()
            try:
                result = ray.get(getattr(actor, method).remote(arg), timeout=self.timeout_s)
                with self._lock:
                    self.latencies.append(time.perf_counter() - start)
                return result
            except GetTimeoutError:
                why, kind = f"gave no answer within controller.score_timeout_s ({self.timeout_s:g}s)", "timeout"
                ray.kill(actor, no_restart=False)  # Ray starts it again
            except Exception as err:
                if not actor_lost(err):
                    raise
                why, kind = f"lost ({type(err).__name__})", "lost"
            if attempt == self.max_attempts:
                break
            self.errors.add(self.name, kind)
            with self._lock:
                self.restarts += 1
            self.log(f"{self.name} actor {index} {why} {at_step(step)}: started again, call sent again")
            self._wait_back(actor, index, step)
        raise RoleFailed(
            f"{self.name} actor {index}: {method} failed {self.max_attempts} times {at_step(step)} ({why})",
            self.name,
        )

    def _wait_back(self, actor, index: int, step: int | None) -> None:
        import ray

        deadline = time.monotonic() + self.start_timeout_s
        while True:  # calls to an actor Ray is still restarting can fail fast; wait until it answers
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except Exception as err:
                if time.monotonic() >= deadline:
                    raise RoleFailed(
                        f"{self.name} actor {index}: not back within controller.start_timeout_s "
                        f"({self.start_timeout_s:g}s) {at_step(step)} ({type(err).__name__})",
                        self.name,
                        "timeout",
                    ) from err
                time.sleep(0.5)

    def submit(self, traj: Trajectories, traj_ref, method: str, step: int | None) -> Joined:
        """`method` on each actor's contiguous shard of `traj`, concurrently (one actor: the batch's own
        object ref, nothing copied); `.result()` joins them in batch order."""
        parts = shard(traj, len(self.actors))
        args = [traj_ref] if len(parts) == 1 else parts
        return Joined([self._pool.submit(self.call, i, method, a, step) for i, a in enumerate(args)])

    def take_latencies(self) -> list[float]:
        with self._lock:
            out, self.latencies = self.latencies, []
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class Supervisor:
    """Starts every role (see the module docstring) and supervises the calls a step makes."""

    def __init__(self, cfg: RunConfig, log=print, max_attempts: int = 3, errors: ErrorTally | None = None):
        self.cfg = cfg
        self.timeouts = cfg.controller
        self.max_attempts = max_attempts
        self.log = log
        self.errors = errors if errors is not None else ErrorTally()  # by role and kind (keel.controller.errors)
        self.groups: dict = {}
        self.pool: RolloutPool | None = None  # the rollout workers and their placement bundles
        self.learners: list = []
        self.reward: StatelessRole | None = None  # the job's reward actors (none with an external server)
        self.reference: StatelessRole | LearnerReference | None = None  # LearnerReference with model.lora
        self.restarts = 0  # rollout workers replaced over the run
        self._replaced: dict[str, object] = {}  # actor id of a replaced worker -> its replacement

    # ------------------------------------------------------------------ start

    def start(self, plan, largest_batch: int, logprob_temperature: float) -> list[dict]:
        """Place every role, start its actors and wait until all are ready (each within
        controller.start_timeout_s); returns the rollout workers' ready reports."""
        from keel.controller.channels import grpc_token_env
        from keel.learner.learner import Learner

        cfg = self.cfg
        self.groups = place_roles(role_requests(cfg), cfg.controller.placement_timeout_s)
        grpc_env = grpc_token_env(cfg)
        self.pool = RolloutPool(cfg, self.groups["rollout"], grpc_env)
        reward_group = self.groups.get("reward")
        rewards = start_rewards(
            cfg,
            reward_group,
            [{**grpc_env, **self.threads(cfg.reward.resources, reward_group, i)} for i in range(cfg.reward.replicas)],
            largest_batch,
        )
        if rewards:
            self.reward = StatelessRole("reward", rewards, cfg.controller, self.max_attempts, self.log, self.errors)
        if reference_on_learner(cfg):  # model.lora: the policy with its adapter off, on the learner ranks
            self.reference = LearnerReference(self)
        elif cfg.reference.enabled:
            group = self.groups["reference"]
            envs = [self.threads(cfg.reference.resources, group, i) for i in range(cfg.reference.replicas)]
            references = start_references(cfg, group, envs, logprob_temperature)
            self.reference = StatelessRole(
                "reference", references, cfg.controller, self.max_attempts, self.log, self.errors
            )
        world = cfg.learner.replicas
        # rank 0's node, reachable from the others
        master_addr, port = rendezvous(self.groups["learner"], 0, cfg.controller.placement_timeout_s)
        for rank in range(world):
            dist_env = {
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": "0",
            }
            group = self.groups["learner"]
            env = {**dist_env, **grpc_env, **self.threads(cfg.learner.resources, group, rank)}
            actor = remote(Learner, cfg.learner.resources, env, in_group(group, rank))
            self.learners.append(actor.remote(cfg.model, cfg.learner, cfg.algorithm, plan))
        ready = self.pool.start(cfg.controller.start_timeout_s)
        others = [(f"learner rank {r}", lr) for r, lr in enumerate(self.learners)]
        for role in filter(None, (self.reward, self.reference)):
            others += [(f"{role.name} actor {i}", a) for i, a in enumerate(role.actors)]
        gather([(who, a.__ray_ready__.remote()) for who, a in others], "start", None, *self._deadline("start"))
        return ready

    def threads(self, resources, group, index: int, explicit: int | None = None) -> dict[str, str]:
        """The thread environment of the actor in bundle `index` of `group` (`role_threads`)."""
        if group is None:  # nothing placed: an external reward server scores
            return {}
        return thread_env(role_threads(self.cfg.controller.mode, resources, node_cpus(group, index), explicit))

    def _deadline(self, kind: str) -> tuple[float, str]:
        """(seconds, the setting's name) of controller.<kind>_timeout_s."""
        setting = f"{kind}_timeout_s"
        return getattr(self.timeouts, setting), f"controller.{setting}"

    # ------------------------------------------------------------------ learner calls

    def on_learners(self, method: str, *args, what: str | None = None, step: int | None = None, kind: str = "update"):
        """`method(*args)` on every learner rank, each rank's result in rank order, within
        controller.<kind>_timeout_s (RoleFailed naming the rank and the step otherwise)."""
        refs = [(f"learner rank {r}", getattr(lr, method).remote(*args)) for r, lr in enumerate(self.learners)]
        return gather(refs, what or method, step, *self._deadline(kind))

    def learner_forward(self, traj_ref, step: int | None, logprobs: bool = True):
        """The learner's own log-probs (None when not asked) and critic values (None without a
        critic) of a batch, (B, R) each: every rank computes its share, joined in rank order."""
        import torch

        shares = self.on_learners(
            "old_logprobs_and_values", traj_ref, logprobs, what="log-prob pass", step=step, kind="score"
        )
        # ranks beyond a batch smaller than the world have no share
        shares = [share for share in shares if share[0] is not None or share[1] is not None]

        def joined(i: int):
            parts = [share[i] for share in shares]
            return None if parts[0] is None else torch.cat(parts)

        return joined(0), joined(1)

    # ------------------------------------------------------------------ rollout

    def collect(self, flight, channels, version: int, step: int) -> list[Trajectories]:
        """Every chunk's trajectories, in chunk order. `version` is the weight version a replacement
        worker loads before it generates (the current one); `step` names the step in errors."""
        import ray

        if flight.ready is not None:
            return flight.ready
        timeout_s = self.timeouts.rollout_timeout_s
        rollout = channels.rollout
        results: dict[int, Trajectories] = {}
        pending = dict(enumerate(flight.refs))  # chunk -> ObjectRef
        deadline = {i: time.monotonic() + timeout_s for i in pending}
        attempts = dict.fromkeys(pending, 1)
        while pending:
            wait_s = max(0.0, min(deadline[i] for i in pending) - time.monotonic())
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=wait_s)
            failed: list[tuple[int, str, str]] = []  # (chunk, why, kind)
            for i, ref in list(pending.items()):
                if ref in ready:
                    del pending[i]
                    try:
                        results[i] = rollout.result(flight, i, ref, max(1.0, deadline[i] - time.monotonic()))
                    except Exception as err:
                        if not actor_lost(err):
                            raise
                        failed.append((i, f"lost ({type(err).__name__})", "lost"))
                elif time.monotonic() >= deadline[i]:
                    del pending[i]
                    why = f"gave no answer within controller.rollout_timeout_s ({timeout_s:g}s)"
                    failed.append((i, why, "timeout"))
            for i, why, kind in failed:
                if attempts[i] >= self.max_attempts:
                    raise RoleFailed(
                        f"rollout: chunk {i} of step {step} failed {attempts[i]} times (last: worker {why})", "rollout"
                    )
                self.errors.add("rollout", kind)
                flight.workers[i] = self.replace(flight.workers[i], channels, version, why)
                pending[i] = rollout.dispatch(flight.workers[i], flight.chunks[i], flight.seed, i)
                deadline[i] = time.monotonic() + timeout_s
                attempts[i] += 1
        return [results[i] for i in range(len(flight.refs))]

    def publish(self, channels, version: int) -> dict[str, float]:
        """Weights `version` to every rollout worker; one that is gone or hung is replaced by a new
        worker loaded with those weights. Returns the weight channel's metrics."""
        workers = list(self.pool.workers)
        metrics, answers = channels.weights.publish(
            self.learners, workers, version, self.timeouts.weight_sync_timeout_s, step=version - 1
        )
        for worker, answer in zip(workers, answers, strict=True):
            if answer in ("lost", "timeout"):
                self.errors.add("rollout", answer)
                why = "lost during" if answer == "lost" else "gave no answer to"
                self.replace(worker, channels, version, f"{why} the weight update")
            else:
                self.pool.serving(worker, answer)
        return metrics

    def replace(self, worker, channels, version: int, why: str):
        """Kill `worker`, start one in its place at weight `version`; returns the new actor. A worker
        replaced already (its loss seen first by another call) maps to its replacement."""
        key = worker._actor_id.hex()
        if key in self._replaced:
            return self._replaced[key]
        new = self.pool.replace(worker, channels, version)
        self._replaced[key] = new
        self.restarts += 1
        self.log(f"rollout worker {why}: replaced (restart {self.restarts}); its prompts go to the new one")
        return new

    def metrics(self) -> dict:
        """Restarts and errors so far, the rollout workers and the weight version each serves (a dict,
        which stays in metrics.jsonl: trackers take numbers only)."""
        out = {"rollout/restarts": float(self.restarts), "rollout/workers": float(len(self.pool.workers))}
        for role in filter(None, (self.reward, self.reference)):
            out[f"{role.name}/restarts"] = float(role.restarts)
        out["rollout/weight_versions"] = self.pool.weight_versions()
        return out | self.errors.metrics()

    # ------------------------------------------------------------------ stop

    def shutdown(self) -> None:
        """Stop every role actor; their resources go back to the cluster."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.pool is not None:
            self.pool.shutdown()
        for role in filter(None, (self.reward, self.reference)):
            role.close()
            for actor in role.actors:
                ray.kill(actor)
        for actor in self.learners:
            ray.kill(actor)
        self.learners = []
        for pg in self.groups.values():
            remove_placement_group(pg)
        self.groups = {}
