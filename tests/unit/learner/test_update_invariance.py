"""The PPO learner's objective does not depend on how a mini-batch is split: one update with
micro-batch 2 or 8, on one rank or two, with or without all-masked padding columns, gives the same
weights in every loss aggregation mode. A per-micro-batch mean (DeepSpeed averaging the shares)
fails this by 1e-3 and more."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from keel.config import AlgorithmConfig, KLConfig, LearnerConfig, ModelConfig, OptimizerConfig
from keel.learner.learner import Learner, LearnerPlan, full_state_dict
from keel.models.loading import load_causal_lm, load_tokenizer, response_logprobs
from keel.trajectory import Trajectories
from unit.learner.test_learner import _batch

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

# Responses of very different lengths, so a mean per micro-batch weighs tokens differently than one
# over the mini-batch.
PAIRS = [
    ("1+1=", "2"),
    ("2+2=", "4 4 4 4 4 4 4 4 4"),
    ("3+3=", "6 6"),
    ("4+4=", "8 8 8 8 8 8 8 8 8 8 8 8 8"),
    ("5+5=", "10"),
    ("6+6=", "12 12 12 12 12"),
    ("7+7=", "14 14 14 14 14 14 14 14 14 14 14"),
    ("8+8=", "16 16 16"),
]


def _scored(model_dir) -> Trajectories:
    """A fixed scored batch: old log-probs from a plain forward pass, seeded advantages, returns and
    reference log-probs. Every learner below trains on exactly these tensors."""
    tok = load_tokenizer(str(model_dir))
    traj = _batch(tok, PAIRS)
    model = load_causal_lm(str(model_dir)).eval()
    mask = traj.response_mask.float()
    old = response_logprobs(model, traj.input_ids, traj.attention_mask, traj.prompt_tokens.shape[1]) * mask
    g = torch.Generator().manual_seed(0)
    shape = old.shape
    return traj.with_fields(
        old_logprobs=old,
        ref_logprobs=(old - 0.3 * torch.randn(shape, generator=g).abs()) * mask,
        advantages=torch.randn(shape, generator=g) * mask,
        values=torch.zeros(shape),
        returns=torch.randn(shape, generator=g) * mask,
    )


def _pad_columns(traj: Trajectories, extra: int, pad_id: int) -> Trajectories:
    """The same batch with `extra` all-masked response columns on the right."""
    B = len(traj)

    def wider(x, fill):
        return torch.cat([x, torch.full((B, extra), fill, dtype=x.dtype)], dim=1)

    return traj.with_fields(
        response_tokens=wider(traj.response_tokens, pad_id),
        response_mask=wider(traj.response_mask, False),
        behaviour_logprobs=wider(traj.behaviour_logprobs, 0.0),
        old_logprobs=wider(traj.old_logprobs, 0.0),
        ref_logprobs=wider(traj.ref_logprobs, 0.0),
        advantages=wider(traj.advantages, 0.0),
        values=wider(traj.values, 0.0),
        returns=wider(traj.returns, 0.0),
    )


def _configs(mode: str, micro: int, replicas: int = 1):
    algo = AlgorithmConfig(
        estimator="gae",
        loss_agg=mode,
        mini_batch_size=8,
        ppo_epochs=1,
        entropy_coef=0.01,
        kl=KLConfig(coef=0.1, placement="loss", estimator="k3"),
    )
    # eps = 1 makes Adam's first step nearly linear in the gradient (lr * g / (|g| + 1)), so the weights
    # compare the gradients themselves rather than the signs of near-zero ones.
    opt = OptimizerConfig(lr=0.05, eps=1.0, max_grad_norm=None)
    learner = LearnerConfig(micro_batch_size=micro, replicas=replicas, optimizer=opt)
    learner = learner.model_copy(update={"critic": learner.critic.model_copy(update={"optimizer": opt})})
    plan = LearnerPlan(temperature=1.0, use_critic=True, total_optimizer_steps=4, norm_len=24)
    return algo, learner, plan


def _update(model_dir, traj: Trajectories, mode: str, micro: int, rank_world=None) -> dict[str, torch.Tensor]:
    """Policy and critic weights after one update."""
    algo, learner_cfg, plan = _configs(mode, micro, rank_world or 1)
    learner = Learner(ModelConfig(policy=str(model_dir)), learner_cfg, algo, plan)
    metrics = learner.update(traj)
    state = {f"policy.{k}": v for k, v in learner.policy_state().items()}
    state |= {f"critic.{k}": v for k, v in full_state_dict(learner.critic).items()}
    return state, metrics


def _on_policy(model_dir, traj: Trajectories, micro: int, rank_world=None):
    """This rank's share of the log-prob pass, then a one-pass update without old_logprobs: (its
    share, the weights after, the metrics, the log-probs the update returned)."""
    algo, learner_cfg, plan = _configs("token-mean", micro, rank_world or 1)
    learner = Learner(ModelConfig(policy=str(model_dir)), learner_cfg, algo, plan)
    share, _ = learner.old_logprobs_and_values(traj)
    metrics, logprobs = learner.update_on_policy(traj.with_fields(old_logprobs=None))
    state = {f"policy.{k}": v for k, v in learner.policy_state().items()}
    state |= {f"critic.{k}": v for k, v in full_state_dict(learner.critic).items()}
    return share, state, metrics, logprobs


class _Rank:
    """One learner rank in its own process (a Ray actor), for the two-rank runs."""

    def update(self, model_dir: str, traj: Trajectories, mode: str, micro: int):
        import os

        state, metrics = _update(model_dir, traj, mode, micro, int(os.environ["WORLD_SIZE"]))
        return state, metrics

    def on_policy(self, model_dir: str, traj: Trajectories, micro: int):
        import os

        return _on_policy(model_dir, traj, micro, int(os.environ["WORLD_SIZE"]))


@pytest.fixture(scope="module")
def setup(tiny_model_dir, ray_session):
    import sys

    from ray import cloudpickle

    from keel.config import Resources
    from keel.controller.actors import free_port, remote

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import the tests
    port = free_port()
    ranks = []
    for rank in range(2):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}
        ranks.append(remote(_Rank, Resources(num_cpus=0.5), {**env, "LOCAL_RANK": "0"}).remote())
    yield tiny_model_dir, _scored(tiny_model_dir), ranks
    import ray

    for r in ranks:
        ray.kill(r)


def _worst(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("mode", MODES)
def test_one_update_is_the_same_however_the_mini_batch_is_split(setup, mode):
    import ray

    model_dir, traj, ranks = setup
    whole, m_whole = _update(model_dir, traj, mode, micro=8)
    micro2, m_micro2 = _update(model_dir, traj, mode, micro=2)
    (two_ranks, m_two), _ = ray.get([r.update.remote(str(model_dir), traj, mode, 2) for r in ranks])
    tok = load_tokenizer(str(model_dir))
    padded, _ = _update(model_dir, _pad_columns(traj, 5, tok.pad_token_id), mode, micro=8)

    from safetensors.torch import load_file

    start = load_file(str(model_dir / "model.safetensors"))
    moved = max((whole[f"policy.{k}"] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, moved  # the update did something to compare
    worst = {"micro 2": _worst(whole, micro2), "2 ranks": _worst(whole, two_ranks), "padding": _worst(whole, padded)}
    assert max(worst.values()) < 1e-6, (mode, moved, worst)
    # the reported loss is the mini-batch's, whatever the split (rank 0 reports the reduced value)
    for key in ("policy/loss", "value/loss", "kl/loss"):
        assert m_micro2[key] == pytest.approx(m_whole[key], abs=1e-6), key
        assert m_two[key] == pytest.approx(m_whole[key], abs=1e-6), key
    assert m_two["policy/ratio_max"] == pytest.approx(m_whole["policy/ratio_max"], abs=1e-5)


def test_metrics_are_reduced_over_ranks(setup):
    """Each rank reports the same metrics: those of the whole mini-batch, not of its own share."""
    import ray

    model_dir, traj, ranks = setup
    (_, m0), (_, m1) = ray.get([r.update.remote(str(model_dir), traj, "token-mean", 4) for r in ranks])
    _, m_one = _update(model_dir, traj, "token-mean", micro=8)
    for key in ("policy/loss", "policy/entropy", "policy/clip_frac", "value/loss", "kl/mean", "policy/grad_norm"):
        assert m0[key] == pytest.approx(m1[key], abs=1e-9), key
        assert m0[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-6), key


def test_update_refuses_a_batch_that_does_not_split_evenly(setup):
    model_dir, traj, _ = setup
    algo, learner_cfg, plan = _configs("token-mean", micro=4)
    learner = Learner(ModelConfig(policy=str(model_dir)), learner_cfg, algo, plan)
    with pytest.raises(ValueError, match="a batch of 6 does not split into mini-batches of 8"):
        learner.update(traj.select(list(range(6))))


def test_dropout_is_off_so_the_first_ratio_is_one(tiny_model_dir, tmp_path):
    """A model with dropout 0.5: the learner's train-mode forward pass is the policy that sampled."""
    model_dir = tmp_path / "dropout"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (model_dir / "config.json").write_text(json.dumps(config))
    algo = AlgorithmConfig(estimator="grpo", mini_batch_size=8, ppo_epochs=1, kl=KLConfig(coef=0.0))
    learner_cfg = LearnerConfig(micro_batch_size=8, optimizer=OptimizerConfig(lr=1e-3))
    plan = LearnerPlan(temperature=1.0, use_critic=False, total_optimizer_steps=4)
    learner = Learner(ModelConfig(policy=str(model_dir)), learner_cfg, algo, plan)
    tok = load_tokenizer(str(model_dir))
    traj = _batch(tok, PAIRS)
    old, _ = learner.old_logprobs_and_values(traj)
    mask = traj.response_mask.float()
    adv = torch.randn(old.shape, generator=torch.Generator().manual_seed(1)) * mask
    metrics = learner.update(traj.with_fields(old_logprobs=old, advantages=adv, returns=adv))
    assert abs(metrics["policy/ratio_max"] - 1.0) < 1e-5 and metrics["policy/clip_frac"] == 0.0, metrics
    assert abs(metrics["policy/approx_kl"]) < 1e-9


def test_the_kl_coefficient_in_the_loss_is_the_one_passed(tiny_model_dir):
    """The adaptive KL controller's coefficient is what the loss uses (placement loss)."""
    traj = _scored(tiny_model_dir)
    out = {}
    for coef in (0.1, 0.4):
        algo, learner_cfg, plan = _configs("token-mean", micro=8)
        learner = Learner(ModelConfig(policy=str(tiny_model_dir)), learner_cfg, algo, plan)
        out[coef] = learner.update(traj, kl_coef=coef)
    assert out[0.1]["kl/coef"] == 0.1 and out[0.4]["kl/coef"] == 0.4
    assert out[0.4]["kl/loss"] == pytest.approx(4 * out[0.1]["kl/loss"], rel=1e-5)


def test_a_one_pass_update_takes_pi_old_from_its_own_forward_pass(setup):
    """update_on_policy (one epoch, one mini-batch) trains exactly as update does after a separate
    log-prob pass, on one rank and on two, and returns those log-probs; the log-prob pass itself
    splits the batch over the ranks, and their shares join to the one-rank result."""
    import ray

    model_dir, traj, ranks = setup
    algo, learner_cfg, plan = _configs("token-mean", micro=4)
    learner = Learner(ModelConfig(policy=str(model_dir)), learner_cfg, algo, plan)
    old, values = learner.old_logprobs_and_values(traj)
    assert (old - traj.old_logprobs).abs().max() < 1e-5 and values.shape == old.shape
    separate, m_separate = _update(model_dir, traj.with_fields(old_logprobs=old), "token-mean", micro=4)

    share, one_rank, m_one, logprobs = _on_policy(model_dir, traj, micro=4)
    assert torch.equal(share, old)
    assert (logprobs - old).abs().max() < 1e-5
    assert _worst(separate, one_rank) < 1e-6
    assert m_one["policy/loss"] == pytest.approx(m_separate["policy/loss"], abs=1e-6)
    assert m_one["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6)

    (s0, two_ranks, m_two, lp0), (s1, _, _, lp1) = ray.get([r.on_policy.remote(str(model_dir), traj, 2) for r in ranks])
    assert s0.shape[0] == s1.shape[0] == len(traj) // 2
    assert (torch.cat([s0, s1]) - old).abs().max() < 1e-5
    assert torch.equal(lp0, lp1) and (lp0 - old).abs().max() < 1e-5  # every rank returns the whole batch's
    assert _worst(separate, two_ranks) < 1e-6
    assert m_two["policy/loss"] == pytest.approx(m_separate["policy/loss"], abs=1e-6)


def test_a_one_pass_update_refuses_several_passes(tiny_model_dir):
    traj = _scored(tiny_model_dir)
    algo, learner_cfg, plan = _configs("token-mean", micro=8)
    algo = algo.model_copy(update={"ppo_epochs": 2})
    learner = Learner(ModelConfig(policy=str(tiny_model_dir)), learner_cfg, algo, plan)
    with pytest.raises(ValueError, match="needs ppo_epochs 1 and mini_batch_size = the batch"):
        learner.update_on_policy(traj.with_fields(old_logprobs=None))
