"""Learner: DeepSpeed engines for the policy (and the critic), the PPO update, weight export.

One Learner is one data-parallel rank. The controller starts `learner.replicas` of them as Ray
actors with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set; each rank takes its slice of every
mini-batch and DeepSpeed averages gradients. gloo on CPU, NCCL on GPU.

The objective does not depend on how a mini-batch is split. Every rank holds the whole batch, so
each computes the mini-batch's loss units (tokens or sequences, per `algorithm.loss_agg`) itself;
a micro-batch's loss is its sum over units divided by that global count, scaled back by the
accumulation steps and ranks that DeepSpeed divides by (as in `keel.learner.offline`). One update
with micro-batch 2 or 8, on 1 rank or 2, gives the same weights.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from keel.algo import (
    Aggregation,
    entropy_from_logits,
    entropy_loss,
    gather_logprobs,
    kl_loss,
    loss_units,
    policy_loss,
    value_loss,
)
from keel.config import (
    AlgorithmConfig,
    GrpcConfig,
    LearnerConfig,
    ModelConfig,
    OptimizerConfig,
    TrainerConfig,
    kl_estimator,
)
from keel.learner.metrics import UpdateMetrics
from keel.models.loading import (
    DTYPES,
    ValueModel,
    apply_lora,
    compute_precision,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    parameter_counts,
    response_logits,
)
from keel.trajectory import Trajectories


@dataclass(frozen=True)
class LearnerPlan:
    """What the learner needs to know beyond its own config section (derived by the controller)."""

    temperature: float  # the sampler's temperature: log-probs are computed at it
    use_critic: bool
    total_optimizer_steps: int  # for the LR schedule
    seed: int = 0
    norm_len: int | None = None  # L of the seq-mean-token-sum-norm loss: rollout.sampling.max_new_tokens
    weights_dtype: str = "float32"  # what the rollout is sent (config.rollout_dtype)


def lr_lambda(opt: OptimizerConfig, total_steps: int):
    """Multiplier of the peak LR at optimizer step s: linear warmup, then constant/linear/cosine decay."""

    def factor(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / decay_steps)
        shape = 1.0 - progress if opt.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * shape

    return factor


def deepspeed_config(
    learner: TrainerConfig, opt: OptimizerConfig, dtype: str, world_size: int, mini_batch: int
) -> dict:
    micro = learner.micro_batch_size
    per_rank = mini_batch // world_size
    if per_rank % micro:
        raise ValueError(
            f"mini-batch {mini_batch} over {world_size} ranks is not a multiple of micro_batch_size {micro}"
        )
    ds = learner.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_rank // micro,
        "gradient_clipping": opt.max_grad_norm or 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": not ds.offload_optimizer,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_engine(
    module, trainer: TrainerConfig, opt: OptimizerConfig, dtype: str, world_size: int, mini_batch: int, steps: int
):
    """A DeepSpeed engine for `module`: AdamW, ZeRO as configured, warmup/decay over `steps`
    optimizer steps; `mini_batch` samples per optimizer step over all ranks."""
    import deepspeed

    from keel.learner import ds_ops

    config = deepspeed_config(trainer, opt, dtype, world_size, mini_batch)
    ds_ops.load_ops([ds_ops.optimizer_op(config)])  # built here, where a killed build's lock cannot hang us
    schedule = lr_lambda(opt, steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=config,
        # stepped by engine.step() at each gradient-accumulation boundary
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    if world_size == 1 and trainer.deepspeed.zero_stage == 0:
        # alone, there is nothing to average: DeepSpeed would still copy every gradient into a flat
        # bucket and back at each accumulation boundary
        engine.enable_backward_allreduce = False
    return engine


def init_distributed(backend: str, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group (rank and world size from the environment); a collective that waits
    on a lost rank fails after `timeout_s` (deepspeed.timeout_s) instead of torch's 10-30 minutes."""
    from datetime import timedelta

    import deepspeed

    from keel.learner import ds_ops

    # DeepSpeed's comm backend loads its comm op (deepspeed.initialize starts the backend too when
    # torch.distributed was set up elsewhere); loaded first here, a dead build's lock cannot hang it
    ds_ops.load_ops([ds_ops.COMM_OP])
    for key, default in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        os.environ.setdefault(key, default)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class Learner:
    """One data-parallel rank of the policy (and critic) trainer."""

    def __init__(self, model: ModelConfig, learner: LearnerConfig, algorithm: AlgorithmConfig, plan: LearnerPlan):
        self.algorithm = algorithm
        self.plan = plan
        self.model_cfg = model
        self.precision = model.precision  # mixed: forward passes under bfloat16 autocast, float32 weights
        self.rank, self.world_size = init_distributed(learner.deepspeed.backend, learner.deepspeed.timeout_s)
        torch.manual_seed(plan.seed)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        self.tokenizer = load_tokenizer(model.tokenizer or model.policy)

        policy = load_causal_lm(model.policy, model.dtype, model.trust_remote_code)
        # Dropout off (as TRL does): with it, the training forward pass is not the policy that
        # sampled, and the first PPO ratio is not 1.
        disable_dropout(policy)
        if learner.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        # model.lora: only the adapters train (and go to the optimizer); with them off the policy is the
        # reference, and a weight sync sends only them
        self.lora = model.lora is not None
        if self.lora:
            if plan.use_critic:
                raise ValueError("model.lora trains no critic: use a critic-free estimator")
            policy = apply_lora(policy, model.lora)
        self.params = parameter_counts(policy)
        self.policy = self._engine(policy, learner, learner.optimizer)
        self.critic = None
        if plan.use_critic:
            critic = ValueModel.from_pretrained(learner.critic.model or model.policy, model.dtype)
            disable_dropout(critic)
            self.critic = self._engine(critic, learner, learner.critic.optimizer)
        self.version = 0
        self.optimizer_steps = 0
        self._publisher = None  # WeightPublisher on rank 0 when weights go over gRPC
        self._shared = None  # SharedWeights on rank 0 when weights go through the object store

    def _engine(self, module, learner: LearnerConfig, opt: OptimizerConfig):
        mini = self.algorithm.mini_batch_size
        steps = self.plan.total_optimizer_steps
        return make_engine(module, learner, opt, self.model_cfg.dtype, self.world_size, mini, steps)

    # ------------------------------------------------------------------ forward passes

    @torch.no_grad()
    def old_logprobs_and_values(
        self, traj: Trajectories, logprobs: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This rank's share of the learner's own log pi_old(a_t) and critic values of a batch, before
        any update: rows `shard_rows(B, world)[rank]`, (b, R) each; the ranks' shares in rank order
        make the batch. `logprobs=False` runs the critic only (its log-probs come with the update,
        `update_on_policy`). Under ZeRO-3 a forward pass is a collective, so every rank makes the same
        number of them (a short share repeats its last micro-batch)."""
        from keel.controller.replicas import shard_rows

        rows = shard_rows(len(traj), self.world_size)
        mine = traj.select(list(rows[self.rank])) if self.rank < len(rows) else None
        micro = self.policy.train_micro_batch_size_per_gpu()
        calls = math.ceil(len(rows[0]) / micro)  # the first share is the largest
        P = traj.prompt_tokens.shape[1]
        logps, values = [], []
        self.policy.eval()
        for c in range(calls):
            if mine is None or c * micro >= len(mine):  # nothing of ours left: keep ZeRO-3's collectives in step
                if self.policy.zero_optimization_stage() == 3:
                    self._forward_part(traj.select([0]), P, logprobs)
                continue
            part = mine.select(list(range(c * micro, min(len(mine), (c + 1) * micro))))
            lp, v = self._forward_part(part, P, logprobs)
            logps.append(lp)
            values.append(v)
        self.policy.train()
        if mine is None:
            return None, None
        rmask = mine.response_mask.float()
        old = torch.cat(logps) * rmask if logprobs else None
        return old, (torch.cat(values) * rmask if self.critic is not None else None)

    @torch.no_grad()
    def reference_logprobs(self, traj: Trajectories) -> torch.Tensor | None:
        """This rank's share of log pi_ref(a_t), (b, R), 0 on padding: the policy with its LoRA adapter
        off (model.lora), so no second copy of the weights exists. The same rows and forward passes as
        `old_logprobs_and_values`: at step 0 (lora_B = 0) the two agree exactly, and the KL is 0."""
        if not self.lora:
            raise RuntimeError("the learner is the reference only with model.lora (its adapter off)")
        with self.policy.module.disable_adapter():
            logprobs, _ = self.old_logprobs_and_values(traj)
        return logprobs

    def _forward_part(self, part: Trajectories, P: int, logprobs: bool) -> tuple[torch.Tensor | None, ...]:
        ids, mask = part.input_ids.to(self.device), part.attention_mask.to(self.device)
        lp = value = None
        if logprobs:
            logits = response_logits(self.policy, ids, mask, P, self.precision)
            lp = gather_logprobs(logits, ids[:, P:], self.plan.temperature).cpu()
        if self.critic is not None:
            with compute_precision(self.precision, self.device):
                value = self.critic(ids, mask, P).float().cpu()
        return lp, value

    # ------------------------------------------------------------------ the PPO update

    def update(self, traj: Trajectories, kl_coef: float | None = None) -> dict[str, float]:
        """PPO epochs over a scored batch (advantages, returns, old_logprobs filled in); returns the
        update's metrics reduced over every rank (a collective: every rank calls it).

        The batch is the full rollout batch; this rank trains on its share of each mini-batch.
        `kl_coef` is the KL coefficient in the loss (placement loss), the adaptive controller's
        current value; unset = algorithm.kl.coef.
        """
        if traj.old_logprobs is None:
            raise ValueError("learner.update needs old_logprobs (update_on_policy computes them itself)")
        return self._update(traj, kl_coef, None)

    def update_on_policy(
        self, traj: Trajectories, kl_coef: float | None = None
    ) -> tuple[dict[str, float], torch.Tensor]:
        """`update` for a batch the current weights sampled, in one pass (one epoch, one mini-batch):
        no optimizer step comes before the last micro-batch, so pi_old is the current log-probs
        themselves (detached; the PPO ratio is 1 with its gradient), and no forward pass runs for
        them beforehand. Returns the metrics and those log-probs, (B, R), gathered from every rank."""
        a = self.algorithm
        if a.ppo_epochs != 1 or a.mini_batch_size != len(traj):
            raise ValueError(
                f"update_on_policy is one pass: needs ppo_epochs 1 and mini_batch_size = the batch ({len(traj)}), "
                f"got {a.ppo_epochs} and {a.mini_batch_size}"
            )
        seen = torch.zeros(traj.response_mask.shape, dtype=torch.float32)
        metrics = self._update(traj, kl_coef, seen)
        if self.world_size > 1:  # each rank filled its own rows
            torch.distributed.all_reduce(seen)
        return metrics, seen * traj.response_mask.float()

    def _update(self, traj: Trajectories, kl_coef: float | None, seen: torch.Tensor | None) -> dict[str, float]:
        """The PPO epochs; `seen` (B, R), when given, is filled with each sample's log-probs as first
        computed, and those stand in for pi_old."""
        a = self.algorithm
        if traj.advantages is None:
            raise ValueError("learner.update needs advantages")
        B, mini, micro = len(traj), a.mini_batch_size, self.policy.train_micro_batch_size_per_gpu()
        if B % mini or mini % (micro * self.world_size):
            raise ValueError(
                f"a batch of {B} does not split into mini-batches of {mini} with equal shares of whole "
                f"micro-batches of {micro} on {self.world_size} ranks"
            )
        t0 = time.perf_counter()
        kl_coef = a.kl.coef if kl_coef is None else kl_coef
        per_rank = mini // self.world_size
        # DeepSpeed divides each micro-batch's loss by the accumulation steps and averages the
        # gradients over ranks; the loss shares are already global, so undo both.
        scale = (per_rank // micro) * self.world_size
        generator = torch.Generator().manual_seed(self.plan.seed + self.version)
        stats = UpdateMetrics()
        for _ in range(a.ppo_epochs):
            order = torch.randperm(B, generator=generator)  # the same on every rank
            for m in range(0, B, mini):
                batch = order[m : m + mini]
                agg = Aggregation(a.loss_agg, self.plan.norm_len, loss_units(traj.response_mask[batch], a.loss_agg))
                mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
                for s in range(0, per_rank, micro):
                    rows = mine[s : s + micro]
                    mb = traj.select(rows)
                    metrics, logprobs = self._train_micro(mb, agg, scale, kl_coef)
                    if seen is not None:
                        seen[rows] = logprobs.cpu()
                    stats.add(metrics, weight=float(mb.response_mask.sum()))
                stats.end_mini_batch()
                self.optimizer_steps += 1
                stats.add({"policy/lr": self.policy.get_lr()[0]})
        self.version += 1
        out = stats.reduce(self.world_size)
        if self.lora:
            out.update(self.params)
        if a.kl.placement == "loss":
            out["kl/coef"] = kl_coef
        out["time/update_s"] = time.perf_counter() - t0
        return out

    def _train_micro(
        self, mb: Trajectories, agg: Aggregation, scale: float, kl_coef: float
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Forward, backward and (at an accumulation boundary) the optimizer step of one micro-batch;
        returns its metrics and its log-probs before the step (detached).

        Its losses are its share of the mini-batch's (`agg` carries the global divisor). Without
        old_logprobs (`update_on_policy`) pi_old is the detached current log-probs.
        """
        a = self.algorithm
        P = mb.prompt_tokens.shape[1]
        ids, attn = mb.input_ids.to(self.device), mb.attention_mask.to(self.device)
        mask = mb.response_mask.to(self.device).float()
        logits = response_logits(self.policy, ids, attn, P, self.precision)  # (b, R, V)
        logprobs = gather_logprobs(logits, ids[:, P:], self.plan.temperature)  # (b, R) log pi_theta(a_t)
        old = logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs.to(self.device)
        loss, metrics = policy_loss(
            logprobs,
            old,
            mb.advantages.to(self.device),
            mask,
            clip_low=a.clip_low,
            clip_high=a.clip_high,
            dual_clip=a.dual_clip,
            agg=agg,
            is_weights=mb.is_weights.to(self.device) if mb.is_weights is not None else None,
        )
        if a.kl.placement == "loss" and kl_coef > 0 and mb.ref_logprobs is not None:
            kl, kl_metrics = kl_loss(logprobs, mb.ref_logprobs.to(self.device), mask, kl_coef, kl_estimator(a.kl), agg)
            loss = loss + kl
            metrics.update(kl_metrics)
        # Entropy of the sampling distribution (temperature applied) is always logged; it carries
        # gradient only when it is part of the loss.
        ent_logits = logits if a.entropy_coef > 0 else logits.detach()
        ent, ent_metrics = entropy_loss(entropy_from_logits(ent_logits, self.plan.temperature), mask, agg)
        if a.entropy_coef > 0:
            loss = loss + a.entropy_coef * ent
        metrics.update(ent_metrics)
        self.policy.backward(loss * scale)
        metrics.update(step_engine(self.policy, "policy/grad_norm"))

        if self.critic is not None:
            with compute_precision(self.precision, self.device):
                values = self.critic(ids, attn, P).float()
            vloss, vmetrics = value_loss(
                values, mb.values.to(self.device), mb.returns.to(self.device), mask, a.value_clip, agg
            )
            self.critic.backward(a.value_coef * vloss * scale)
            metrics.update(step_engine(self.critic, "value/grad_norm"))
            metrics.update(vmetrics)
        return metrics, logprobs.detach()

    # ------------------------------------------------------------------ weights out

    def policy_state(self) -> dict[str, torch.Tensor]:
        """Full policy weights under HF names, on CPU (gathered from ZeRO-3 shards when needed); with
        model.lora, those of the merged model (W0 + scale * B @ A)."""
        if self.lora:
            from keel.models.lora import merged_state

            return merged_state(self.policy.module)
        return full_state_dict(self.policy)

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0's policy as the rollout takes it: the full weights (floating tensors in
        plan.weights_dtype), or with model.lora only the adapters (keel.models.lora); None on other
        ranks. Every rank must call it: under ZeRO-3 gathering the shards is a collective."""
        if self.lora:
            from keel.models.lora import adapter_state

            return adapter_state(self.policy.module, DTYPES[self.model_cfg.dtype]) if self.rank == 0 else None
        state = self.policy_state()
        if self.rank != 0:
            return None
        wire = DTYPES[self.plan.weights_dtype]
        return {k: v.to(wire) if v.is_floating_point() else v for k, v in state.items()}

    def export_shared(self, version: int):
        """The policy written as `version` into rank 0's shared-memory buffer for the rollout workers
        on its node (keel.transport.shm), floating tensors in plan.weights_dtype (with model.lora: only
        the adapters, as `export_weights`); returns its handle (None on other ranks). Read straight from
        the parameters: no copy before the write. Every rank must call it: under ZeRO-3 gathering the
        shards is a collective."""
        import ray

        from keel.transport.shm import SharedWeights

        if self.rank == 0 and self._shared is None:
            self._shared = SharedWeights(ray.get_runtime_context().get_node_id())
        if self.lora:
            state = self.export_weights()
            return None if state is None else self._shared.write(version, state, None)
        with whole_params(self.policy) as module:
            if self.rank != 0:
                return None
            return self._shared.write(version, module.state_dict(), DTYPES[self.plan.weights_dtype])

    def export_packed_weights(self):
        """`export_weights` as numpy arrays for the object store (keel.transport.objectstore.pack)."""
        from keel.transport.objectstore import pack

        state = self.export_weights()
        return None if state is None else pack(state)

    def serve_weights(self, grpc_cfg: GrpcConfig) -> str:
        """Start this rank's WeightService; returns the address rollout workers dial."""
        from keel.transport.weights import WeightPublisher

        self._publisher = WeightPublisher(grpc_cfg)
        return self._publisher.address

    def publish_weights(self, version: int) -> dict[str, int]:
        """Publish the current policy as `version` on this rank's WeightService (every rank calls
        it, as with export_weights; ranks without a service only take part in the gather)."""
        state = self.export_weights()
        if self._publisher is None or state is None:
            return {}
        manifest = self._publisher.publish(version, state)
        return {"version": manifest.version, "bytes": manifest.total_bytes, "tensors": len(manifest.tensors)}

    def save_checkpoint(self, directory: str) -> None:
        """This rank's share of a checkpoint under `directory`: the policy's and critic's DeepSpeed
        state (optimizer and LR schedule included), the update counters and this process's RNG
        states. A collective: every rank calls it."""
        d = Path(directory)
        save_engine(self.policy, d / "policy")
        if self.critic is not None:
            save_engine(self.critic, d / "critic")
        own = {"version": self.version, "optimizer_steps": self.optimizer_steps, "rng": rng_state()}
        torch.save(own, d / f"learner-rank{self.rank}.pt")

    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote (a collective); returns the weight version."""
        d = Path(directory)
        load_engine(self.policy, d / "policy")
        if self.critic is not None:
            load_engine(self.critic, d / "critic")
        own = torch.load(d / f"learner-rank{self.rank}.pt", weights_only=False)
        self.version, self.optimizer_steps = own["version"], own["optimizer_steps"]
        set_rng_state(own["rng"])
        return self.version

    def stop_serving(self) -> None:
        if self._publisher is not None:
            self._publisher.stop(0)
            self._publisher = None

    def save_hf(self, out_dir: str | Path) -> Path:
        """HF-format policy (save_pretrained + tokenizer) at `out_dir`; written by rank 0 only. With
        model.lora: the PEFT adapter at `out_dir` and the merged model in `out_dir`/merged."""
        out = Path(out_dir)
        if self.lora:
            from keel.models.lora import save_adapter_and_merged

            if self.rank == 0:
                save_adapter_and_merged(self.policy.module, out, self.tokenizer)
            return out
        state = self.policy_state()
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self.policy.module.save_pretrained(out, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out)
        return out


@contextmanager
def whole_params(engine):
    """An engine's module with its parameters whole inside the block: under ZeRO-3 the shards are
    gathered (a collective: every rank must enter it), otherwise they already are."""
    if engine.zero_optimization_stage() != 3:
        yield engine.module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield engine.module


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """An engine's whole module state on CPU under its own names (a collective under ZeRO-3)."""
    with whole_params(engine) as module:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def step_engine(engine, key: str) -> dict[str, float]:
    """engine.step(); at an accumulation boundary also report the pre-clip global grad norm.

    DeepSpeed tracks the norm under ZeRO 1-3; under ZeRO 0 the gradients are whole on every rank
    (already averaged), so it is read off them before the optimizer step zeroes them.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and engine.zero_optimization_stage() == 0:
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm().item() if grads else 0.0
    engine.step()
    if not boundary:
        return {}
    if norm is None:
        reported = engine.get_global_grad_norm()
        norm = (
            float(reported.item() if isinstance(reported, torch.Tensor) else reported) if reported is not None else None
        )
    return {} if norm is None else {key: norm}


# ---------------------------------------------------------------------------------- checkpoints


def save_engine(engine, directory: Path) -> None:
    """Every rank's DeepSpeed state of `engine` (module, optimizer, LR schedule; ZeRO shards per
    rank) under `directory`. A collective: every rank calls it with the same directory, which must
    be shared storage when ranks are on several nodes. Frozen parameters (a LoRA base) are left out:
    they are the checkpoint the run started from."""
    engine.save_checkpoint(str(directory), tag="ds", save_latest=False, exclude_frozen_parameters=True)


def load_engine(engine, directory: Path) -> None:
    """Restore what `save_engine` wrote, optimizer and LR schedule included (a collective). With
    frozen parameters the module's state is partial: they keep what the model was loaded with."""
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    path, _ = engine.load_checkpoint(
        str(directory),
        tag="ds",
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=not frozen,
    )
    if path is None:
        raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint to load")


def rng_state() -> dict:
    """This process's random number generators (python, numpy, torch CPU and CUDA)."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
