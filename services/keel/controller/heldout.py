"""Held-out evaluation during `keel train` (`data.eval_prompts`, `logging.eval_every`).

After every `eval_every` steps, and after the last step, the current policy answers each held-out
prompt once on the rollout workers: sampled as rollout.sampling says but with n = 1, and with the
same seed at every evaluation, so two evaluations differ by the policy and not by the draw. The
reward role scores the answers, the reference and the learner give their log-probs, and one
metrics line records, for the policy after `step` updates (weight version `step`):

  eval/reward_mean      mean reward, as the reward role scores training batches (the sources combined,
                        whitened over the held-out batch where a source says so, and clipped)
  eval/reward/<name>_mean  each reward source's raw mean
  eval/kl               mean over samples of sum_t KL_t(pi || pi_ref), k1: the training metric `kl`
                        (`sequence_kl`) on these samples; left out when the reference is disabled
  eval/response_length  generated tokens per sample
  eval/task_metric      mean of data.eval_task_metric, a 0/1 per-sample function (when set)

The answers come back as the rollout actors' return values whatever transport.trajectories says:
they are measured, never trained on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from keel.config import RewardConfig, RunConfig, SamplingConfig, sampling_seed
from keel.controller.advantages import sequence_kl
from keel.controller.channels import split
from keel.data.prompts import Prompt
from keel.trajectory import Trajectories


@dataclass(frozen=True)
class HeldOut:
    """The held-out prompts of a run and how, and when, they are evaluated."""

    prompts: list[Prompt]
    every: int  # logging.eval_every: 0 = after the last step only
    last_step: int  # controller.steps
    sampling: SamplingConfig  # rollout.sampling with n = 1
    seed: int
    task_metric: Callable | None  # fn(prompts, responses, metadata) -> 0/1 per sample
    reward: RewardConfig  # how the reward sources combine

    @classmethod
    def from_config(cls, cfg: RunConfig, prompts: list[Prompt]) -> HeldOut:
        """Raises RewardError when data.eval_task_metric cannot be imported."""
        from keel.reward.model import import_function

        metric = cfg.data.eval_task_metric
        return cls(
            prompts=prompts,
            every=cfg.logging.eval_every,
            last_step=cfg.controller.steps,
            sampling=cfg.rollout.sampling.model_copy(update={"n": 1}),
            seed=sampling_seed(cfg) * 1_000_003 + 7,  # apart from the training rollouts' seeds
            task_metric=import_function(metric, "data.eval_task_metric") if metric else None,
            reward=cfg.reward,
        )

    def due(self, step: int) -> bool:
        """Whether to evaluate after `step` steps (>= 1)."""
        return step == self.last_step or (self.every > 0 and step > 0 and step % self.every == 0)

    def generate(self, workers: list, pad_token_id: int, step: int, timeout_s: float) -> Trajectories:
        """One answer per held-out prompt, the prompts split across the rollout workers (RoleFailed
        naming the worker when one is lost or does not answer within `timeout_s`)."""
        from keel.controller.supervisor import gather

        chunks = [(w, c) for w, c in zip(workers, split(self.prompts, len(workers)), strict=True) if c]
        calls = [
            (f"rollout worker {i}", w.generate.remote(c, self.seed + i * 101, self.sampling))
            for i, (w, c) in enumerate(chunks)
        ]
        parts = gather(calls, "held-out evaluation", step, timeout_s, "controller.rollout_timeout_s")
        return Trajectories.concat(parts, pad_token_id)

    def run(self, workers: list, reward, supervisor, pad_token_id: int, step: int) -> dict[str, float]:
        """Generate, score (reward, reference and learner concurrently, as a step does) and measure.
        `reward` is the reward channel, `supervisor` the run's Supervisor (reference and learners);
        `step` (steps done) names the evaluation in errors."""
        import ray

        from keel.reward.combine import combine

        t0 = time.perf_counter()
        traj = self.generate(workers, pad_token_id, step, supervisor.timeouts.rollout_timeout_s)
        traj_ref = ray.put(traj)
        scores = reward.submit(traj, traj_ref, step)
        reference = supervisor.reference
        ref = reference.submit(traj, traj_ref, "logprobs", step) if reference is not None else None
        old, _ = supervisor.learner_forward(traj_ref, step)
        reward = combine(scores.result(), self.reward, traj.sample_ids)  # (B, S) per source -> (B,)
        traj = traj.with_fields(scores=reward.scores, ref_logprobs=ref.result() if ref else None, old_logprobs=old)
        m = {"weight_version": traj.weight_version, **self.metrics(traj)}
        m.update({f"eval/{k}": v for k, v in reward.metrics.items()})  # eval/reward/<name>_mean
        return {**m, "eval/time_s": time.perf_counter() - t0}

    def metrics(self, traj: Trajectories) -> dict[str, float]:
        """The eval/* metrics of a scored batch (scores, old_logprobs and, optionally, ref_logprobs)."""
        m = {
            "eval/samples": float(len(traj)),
            "eval/reward_mean": traj.scores.mean().item(),
            "eval/response_length": traj.response_mask.sum(-1).float().mean().item(),
        }
        if traj.ref_logprobs is not None:
            m["eval/kl"] = sequence_kl(traj, "k1")
        if self.task_metric is not None:
            values = [float(v) for v in self.task_metric(traj.prompts, traj.responses, traj.metadata)]
            if len(values) != len(traj):
                raise ValueError(f"data.eval_task_metric: {len(values)} values for {len(traj)} samples")
            m["eval/task_metric"] = sum(values) / len(values)
        return m


def format_eval(m: dict) -> str:
    """`eval after step 4: reward +0.310  kl 0.0123  len 3.2  task 0.250  (64 prompts, 1.2s)`"""
    parts = [f"eval after step {m['step']}: reward {m['eval/reward_mean']:+.3f}"]
    if "eval/kl" in m:
        parts.append(f"kl {m['eval/kl']:.4f}")
    parts.append(f"len {m['eval/response_length']:.1f}")
    if "eval/task_metric" in m:
        parts.append(f"task {m['eval/task_metric']:.3f}")
    parts.append(f"({m['eval/samples']:.0f} prompts, {m['eval/time_s']:.1f}s)")
    return "  ".join(parts)
