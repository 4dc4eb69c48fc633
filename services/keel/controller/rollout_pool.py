"""The rollout workers of a run, whose number can change while it trains.

The pool starts `rollout.replicas` workers in the role's placement group. `scale(n)` runs between
steps, when no rollout is in flight. A new worker takes a free bundle of that group, or a
placement group of its own (the usual clear error when the cluster cannot hold it). It is
connected to the job's gRPC endpoints and loaded with the current weights before the controller
gives it prompts. A removed worker has no prompts: prompts are split across workers when a
rollout is launched, after scaling. Adding is all-or-nothing: if one new worker cannot be placed
or loaded, the ones already started are stopped and the pool stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.config import RunConfig, max_model_len, sampling_seed
from keel.controller.actors import remote, role_threads, thread_env
from keel.controller.placement import RoleRequest, in_group, node_cpus, place_roles
from keel.controller.scaling import request_capacity


@dataclass
class Slot:
    group: object  # placement group
    index: int  # bundle index in it
    owned: bool  # a group made for this one worker (removed with it)


class RolloutPool:
    def __init__(self, cfg: RunConfig, group, env: dict[str, str]):
        self.cfg = cfg
        self.workers: list = []  # the list the channels read: changed in place
        self.names: list[str] = []  # each worker's id ("rollout-3"), in the same order
        self.versions: dict[str, int] = {}  # worker id -> the weight version it serves (answered by it)
        self._slots: list[Slot] = []
        self._group = group
        self._free = list(range(cfg.rollout.replicas - 1, -1, -1))  # free bundles of the role's group (stack)
        self._env = env
        self._next_id = 0
        self._asked_capacity = False  # a standing request to Ray's autoscaler (scale), withdrawn at shutdown

    def start(self, timeout_s: float) -> list[dict]:
        """Start `rollout.replicas` workers; returns their `ready()` reports (RoleFailed naming the
        worker that is not ready within `timeout_s`, controller.start_timeout_s)."""
        from keel.controller.supervisor import gather

        for _ in range(self.cfg.rollout.replicas):
            slot = Slot(self._group, self._free.pop(), owned=False)
            worker, name = self._new_worker(slot)
            self.workers.append(worker)
            self.names.append(name)
            self._slots.append(slot)
        calls = [(f"rollout worker {i}", w.ready.remote()) for i, w in enumerate(self.workers)]
        ready = gather(calls, "start", None, timeout_s, "controller.start_timeout_s")
        for name, report in zip(self.names, ready, strict=True):
            self.versions[name] = report["weight_version"]
        return ready

    def serving(self, worker, version: int) -> None:
        """`worker` answered that it serves weight `version`."""
        index = next(i for i, w in enumerate(self.workers) if w is worker)
        self.versions[self.names[index]] = version

    def weight_versions(self) -> dict[str, int]:
        """Each worker's id -> the weight version it serves, in worker order."""
        return {name: self.versions[name] for name in self.names}

    def _new_worker(self, slot: Slot) -> tuple[object, str]:
        """A new worker actor in `slot`, and its id."""
        from keel.rollout.worker import RolloutWorker

        cfg = self.cfg
        worker_id = f"rollout-{self._next_id}"
        self._next_id += 1
        threads = role_threads(
            cfg.controller.mode, cfg.rollout.resources, node_cpus(slot.group, slot.index), cfg.rollout.threads
        )
        env = {**self._env, **thread_env(threads)}
        actor = remote(RolloutWorker, cfg.rollout.resources, env, in_group(slot.group, slot.index))
        return actor.remote(cfg.model, cfg.rollout, max_model_len(cfg), sampling_seed(cfg), worker_id), worker_id

    def _take_slot(self, target: int) -> Slot:
        if self._free:
            return Slot(self._group, self._free.pop(), owned=False)
        request = RoleRequest(
            f"rollout (scaling {len(self.workers)} -> {target} workers)", 1, self.cfg.rollout.resources
        )
        # on an autoscaling cluster this wait includes starting a node (`scale` asked for it first)
        group = place_roles([request], self.cfg.controller.placement_timeout_s)[request.role]
        return Slot(group, 0, owned=True)

    def _release(self, slot: Slot) -> None:
        from ray.util.placement_group import remove_placement_group

        if slot.owned:
            remove_placement_group(slot.group)
        else:
            self._free.append(slot.index)

    def scale(self, n: int, channels, version: int) -> None:
        """Grow or shrink to `n` workers; new ones connected and at weight `version` before they return.

        Ray's autoscaler is asked first for room for the run with `n` workers (`request_capacity`):
        growing, new nodes start while the new workers' placement groups wait for them; shrinking,
        the nodes the removed workers free may go once idle. A failed grow asks again for the
        workers the pool keeps."""
        import ray

        if not 1 <= n <= self.cfg.controller.prompts_per_step:
            raise ValueError(f"rollout workers must be in [1, {self.cfg.controller.prompts_per_step}], got {n}")
        request_capacity(self.cfg, n)
        self._asked_capacity = True
        added: list[tuple[object, str, Slot]] = []
        try:
            while len(self.workers) + len(added) < n:
                slot = self._take_slot(n)
                added.append((*self._new_worker(slot), slot))
            grpc_cfg, timeout = self.cfg.transport.grpc, self.cfg.controller.weight_sync_timeout_s
            for worker, _, _ in added:
                ray.get(worker.ready.remote(), timeout=self.cfg.controller.start_timeout_s)
                channels.connect(worker, grpc_cfg)
                channels.weights.catch_up(worker, version, timeout)
        except BaseException:
            for worker, _, slot in added:
                ray.kill(worker)
                self._release(slot)
            request_capacity(self.cfg, len(self.workers))
            raise
        for worker, name, slot in added:
            self.workers.append(worker)
            self.names.append(name)
            self.versions[name] = version
            self._slots.append(slot)
        while len(self.workers) > n:
            self._remove_last()

    def replace(self, worker, channels, version: int):
        """Kill `worker` (lost or hung) and start another in its placement bundle, connected and at
        weight `version`, before it gets prompts; returns the new actor."""
        import ray

        index = next(i for i, w in enumerate(self.workers) if w is worker)
        ray.kill(worker, no_restart=True)
        new, name = self._new_worker(self._slots[index])
        ray.get(new.ready.remote(), timeout=self.cfg.controller.start_timeout_s)
        channels.connect(new, self.cfg.transport.grpc)
        channels.weights.catch_up(new, version, self.cfg.controller.weight_sync_timeout_s)
        self.versions.pop(self.names[index])
        self.workers[index], self.names[index], self.versions[name] = new, name, version
        return new

    def _remove_last(self) -> None:
        import ray

        ray.kill(self.workers.pop())
        self.versions.pop(self.names.pop())
        self._release(self._slots.pop())

    def shutdown(self) -> None:
        while self.workers:
            self._remove_last()
        if self._asked_capacity:  # the run is over: its nodes may go once idle
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
            self._asked_capacity = False
