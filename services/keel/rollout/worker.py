"""RolloutWorker: prompts in, `Trajectories` out; weight updates applied all-or-nothing.

Inside Ray, the controller hands it prompts and weights through the object store. With a
channel set to grpc, it fetches weights from the learner's WeightService and pushes its
trajectories to the controller's TrajectoryService instead (`connect`, `pull_weights`,
`generate_and_push`); that is also how a worker outside the Ray cluster runs.
"""

from __future__ import annotations

import uuid

import torch

from keel.config import GrpcConfig, ModelConfig, RolloutConfig, SamplingConfig, rollout_dtype
from keel.data.prompts import Prompt
from keel.models.loading import DTYPES, load_tokenizer
from keel.rollout.base import Generator
from keel.trajectory import Trajectories, pad_prompts_and_responses


class WeightUpdateError(ValueError):
    """A weight update that cannot be applied; the old weights keep serving."""


def make_generator(model: ModelConfig, rollout: RolloutConfig, tokenizer, max_model_len: int, seed: int) -> Generator:
    if rollout.backend == "vllm":
        from keel.rollout.vllm_backend import VLLMGenerator

        dtype = rollout_dtype(model, rollout)
        return VLLMGenerator(model.policy, tokenizer, dtype, max_model_len, rollout.vllm, seed)
    from keel.rollout.hf_backend import HFGenerator

    return HFGenerator(model.policy, tokenizer, model.dtype, precision=model.precision)


class RolloutWorker:
    """One rollout generator. The controller wraps it in a Ray actor; tests use it directly."""

    adapter = None  # AdapterMerger (keel.rollout.adapter) with model.lora: syncs carry only the adapters

    def __init__(
        self, model: ModelConfig, rollout: RolloutConfig, max_model_len: int, seed: int, worker_id: str = "rollout-0"
    ):
        self.worker_id = worker_id
        self.sampling = rollout.sampling
        if rollout.threads:
            torch.set_num_threads(rollout.threads)
        self.tokenizer = load_tokenizer(model.tokenizer or model.policy)
        self.generator = make_generator(model, rollout, self.tokenizer, max_model_len, seed)
        self.weight_version = 0
        self._specs = self.generator.weight_specs()
        # what the learner sends: the same names and shapes, floating tensors in the rollout's dtype (a
        # checkpoint saved in another dtype is cast on load); a weight manifest must match it exactly
        wire = DTYPES[rollout_dtype(model, rollout)]
        self._wire_specs = {k: (shape, wire if dt.is_floating_point else dt) for k, (shape, dt) in self._specs.items()}
        # model.lora: the learner sends only the adapters, merged here into the base of their layers
        if model.lora is not None:
            from keel.rollout.adapter import AdapterMerger

            self.adapter = AdapterMerger(model, self._specs, self.generator, wire)
            self._wire_specs = dict(self.adapter.specs)
        self._weights = None  # WeightClient, once connected
        self._pusher = None  # TrajectoryPusher, once connected

    def ready(self) -> dict:
        return {"worker_id": self.worker_id, "backend": self.generator.backend, "weight_version": self.weight_version}

    def generate(self, prompts: list[Prompt], seed: int, sampling: SamplingConfig | None = None) -> Trajectories:
        """n samples for each prompt, as one padded batch tagged with this worker's weight version."""
        sampling = sampling or self.sampling
        samples = self.generator.generate([p.token_ids for p in prompts], sampling, seed)
        tok = self.tokenizer
        chosen = [prompts[s.prompt_index] for s in samples]
        prompt_tokens, prompt_mask, response_tokens, response_mask = pad_prompts_and_responses(
            [p.token_ids for p in chosen], [s.token_ids for s in samples], tok.pad_token_id
        )
        logprobs = torch.zeros(response_tokens.shape, dtype=torch.float32)
        sample_index, seen = [], {}
        for b, s in enumerate(samples):
            if s.token_ids:
                logprobs[b, : len(s.token_ids)] = torch.tensor(s.logprobs)
            sample_index.append(seen.get(s.prompt_index, 0))
            seen[s.prompt_index] = sample_index[-1] + 1
        return Trajectories(
            rollout_id=f"{self.worker_id}-{uuid.uuid4().hex[:12]}",
            weight_version=self.weight_version,
            prompt_ids=[p.prompt_id for p in chosen],
            sample_index=sample_index,
            prompt_tokens=prompt_tokens,
            prompt_mask=prompt_mask,
            response_tokens=response_tokens,
            response_mask=response_mask,
            behaviour_logprobs=logprobs,
            prompts=[p.text for p in chosen],
            responses=tok.batch_decode([s.token_ids for s in samples], skip_special_tokens=True),
            metadata=[dict(p.metadata) for p in chosen],
        )

    def update_weights(self, state: dict, version: int) -> int:
        """Check the whole update, then apply it; on any problem raise and keep the old weights.
        `state` is name -> tensor, or what keel.transport.objectstore.pack made of it: the full
        weights, or with model.lora the adapters (keel.models.lora), merged here into the base weights
        of their layers, which alone are reloaded.

        Returns the new weight version.
        """
        from keel.transport.objectstore import unpack

        if state and isinstance(next(iter(state.values())), tuple):
            state = unpack(state)
        if version <= self.weight_version:
            raise WeightUpdateError(
                f"{self.worker_id}: version {version} is not newer than the serving {self.weight_version}"
            )
        check_weights(state, self._specs if self.adapter is None else self.adapter.specs, self.worker_id)
        if self.adapter is not None:
            state = self.adapter.merge(state)
            for name, tensor in state.items():  # finite adapters can still overflow a 16-bit weight
                if not all_finite(tensor):
                    raise WeightUpdateError(f"{self.worker_id}: merged tensor {name!r} has non-finite values")
        self.generator.load_weights(list(state.items()))
        self.weight_version = version
        return version

    def update_weights_shared(self, handle, version: int) -> int | None:
        """`update_weights` from the learner's shared-memory buffer (keel.transport.shm), mapped, not
        copied, before the load; None (nothing changed) when the learner is on another node."""
        import ray

        from keel.transport.shm import NotOnThisNode, StaleHandle, read_shared

        try:
            state = read_shared(handle, ray.get_runtime_context().get_node_id())
        except NotOnThisNode:
            return None
        except StaleHandle as err:
            raise WeightUpdateError(f"{self.worker_id}: {err}") from None
        return self.update_weights(state, version)

    # ------------------------------------------------------------------ over gRPC

    def connect(self, grpc_cfg: GrpcConfig, weights: str | None = None, trajectories: str | None = None) -> None:
        """Fetch weights from the WeightService at `weights` and push trajectories to the
        TrajectoryService at `trajectories` (host:port each; None keeps that channel off gRPC)."""
        from keel.transport.trajectories import TrajectoryPusher
        from keel.transport.weights import WeightClient

        self._weights = WeightClient(grpc_cfg, weights, expected=self._wire_specs) if weights else None
        self._pusher = TrajectoryPusher(grpc_cfg, trajectories, self.worker_id) if trajectories else None

    def pull_weights(self, version: int = 0) -> int:
        """Fetch `version` (0 = the latest) over gRPC and apply it all-or-nothing: a fetch that
        fails any check raises WeightFetchError and the old weights keep serving."""
        if self._weights is None:
            raise RuntimeError(f"{self.worker_id}: no WeightService connected (call connect first)")
        fetched, state = self._weights.fetch(version)
        if version and fetched != version:
            raise WeightUpdateError(f"{self.worker_id}: asked for version {version}, the service sent {fetched}")
        return self.update_weights(state, fetched)

    def generate_and_push(self, prompts: list[Prompt], seed: int, sampling: SamplingConfig | None = None) -> str:
        """`generate`, then push the batch to the TrajectoryService; returns its rollout id.
        Raises TrajectoryRejected when the learner side refuses it (stale, ahead, duplicate)."""
        from keel.transport.trajectories import TrajectoryRejected

        if self._pusher is None:
            raise RuntimeError(f"{self.worker_id}: no TrajectoryService connected (call connect first)")
        traj = self.generate(prompts, seed, sampling)
        [ack] = self._pusher.push([traj])
        if not ack.accepted:
            raise TrajectoryRejected(f"{self.worker_id}: batch {traj.rollout_id} refused: {ack.reason}")
        return traj.rollout_id


def check_weights(
    state: dict[str, torch.Tensor], specs: dict[str, tuple[tuple[int, ...], torch.dtype]], who: str
) -> None:
    """Every expected tensor present, no unknown names, shapes equal, values finite."""
    missing = sorted(set(specs) - set(state))
    unknown = sorted(set(state) - set(specs))
    if missing:
        raise WeightUpdateError(f"{who}: weight update lacks {len(missing)} tensors, first {missing[0]!r}")
    if unknown:
        raise WeightUpdateError(f"{who}: weight update has unknown tensor {unknown[0]!r}")
    for name, tensor in state.items():
        shape, _ = specs[name]
        if tuple(tensor.shape) != shape:
            raise WeightUpdateError(f"{who}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise WeightUpdateError(f"{who}: tensor {name!r} has non-finite values")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one read pass: a NaN or an infinity makes the float32 sum
    non-finite. Only when it is (an overflow of huge finite values could do that too) are the
    values checked one by one."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())
