"""The DeepSpeed learner on CPU (gloo), without Ray."""

from __future__ import annotations

import pytest
import torch

from keel.algo import policy_loss
from keel.config import AlgorithmConfig, DeepSpeedConfig, KLConfig, LearnerConfig, ModelConfig, OptimizerConfig
from keel.learner.learner import Learner, LearnerPlan, lr_lambda
from keel.models.loading import load_tokenizer
from keel.trajectory import Trajectories


def _batch(tok, texts_and_responses, version=0):
    B = len(texts_and_responses)
    prompts = [tok(p).input_ids for p, _ in texts_and_responses]
    responses = [tok(r).input_ids + [tok.eos_token_id] for _, r in texts_and_responses]
    P, R = max(map(len, prompts)), max(map(len, responses))
    pt = torch.full((B, P), tok.pad_token_id)
    pm = torch.zeros(B, P, dtype=torch.bool)
    rt = torch.full((B, R), tok.pad_token_id)
    rm = torch.zeros(B, R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        pt[i, P - len(p) :], pm[i, P - len(p) :] = torch.tensor(p), True
        rt[i, : len(r)], rm[i, : len(r)] = torch.tensor(r), True
    return Trajectories(
        rollout_id="t",
        weight_version=version,
        prompt_ids=[str(i) for i in range(B)],
        sample_index=[0] * B,
        prompt_tokens=pt,
        prompt_mask=pm,
        response_tokens=rt,
        response_mask=rm,
        behaviour_logprobs=torch.zeros(B, R),
        prompts=[p for p, _ in texts_and_responses],
        responses=[r for _, r in texts_and_responses],
    )


def _learner(model_dir, zero=0, critic=True, kl_placement="reward", epochs=2):
    algo = AlgorithmConfig(
        estimator="gae" if critic else "grpo",
        mini_batch_size=4,
        ppo_epochs=epochs,
        kl=KLConfig(coef=0.1, placement=kl_placement),
    )
    learner = LearnerConfig(
        micro_batch_size=2, deepspeed=DeepSpeedConfig(zero_stage=zero), optimizer=OptimizerConfig(lr=2e-4)
    )
    plan = LearnerPlan(temperature=1.0, use_critic=critic, total_optimizer_steps=10)
    return Learner(ModelConfig(policy=str(model_dir)), learner, algo, plan)


PAIRS = [("3+4=", "7"), ("3+4=", "9 9"), ("1+1=", "2"), ("1+1=", "cat")]


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_ppo_update_moves_logprobs_the_way_advantages_point(tiny_model_dir, zero):
    learner = _learner(tiny_model_dir, zero=zero)
    tok = load_tokenizer(str(tiny_model_dir))
    traj = _batch(tok, PAIRS)
    old, values = learner.old_logprobs_and_values(traj)
    assert values is not None and values.abs().max() == 0  # zero-initialised value head
    mask = traj.response_mask.float()
    # Ratio is exactly 1 before the update: the learner's own forward pass defines pi_old.
    _, metrics = policy_loss(old, old, torch.ones_like(old), mask)
    assert metrics["policy/ratio_mean"] == 1.0
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1) * mask
    returns = adv.clone()
    scored = traj.with_fields(
        old_logprobs=old, values=values, advantages=adv, returns=returns, ref_logprobs=old.clone()
    )
    metrics = learner.update(scored)
    for key in (
        "policy/loss",
        "policy/clip_frac",
        "policy/approx_kl",
        "policy/entropy",
        "policy/grad_norm",
        "value/loss",
    ):
        assert key in metrics and metrics[key] == metrics[key], key
    new, new_values = learner.old_logprobs_and_values(traj)
    seq_gain = ((new - old) * mask).sum(-1)
    # responses rewarded +1 became more likely, those at -1 less likely
    assert seq_gain[[0, 2]].min() > 0 > seq_gain[[1, 3]].max(), seq_gain
    assert (new_values * mask).abs().sum() > 0  # the critic learned something
    assert learner.version == 1 and learner.optimizer_steps == 2


def test_kl_in_loss_and_exported_weights(tiny_model_dir, tmp_path):
    learner = _learner(tiny_model_dir, critic=False, kl_placement="loss", epochs=1)
    tok = load_tokenizer(str(tiny_model_dir))
    traj = _batch(tok, PAIRS)
    old, values = learner.old_logprobs_and_values(traj)
    assert values is None
    mask = traj.response_mask.float()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1) * mask
    metrics = learner.update(traj.with_fields(old_logprobs=old, advantages=adv, returns=adv, ref_logprobs=old.clone()))
    assert "kl/loss" in metrics and "value/loss" not in metrics
    state = learner.policy_state()
    from safetensors.torch import load_file

    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(state) == set(original)
    assert any(not torch.equal(state[k], original[k]) for k in state)
    out = learner.save_hf(tmp_path / "ckpt")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.state_dict()["lm_head.weight"], state["lm_head.weight"])
    assert (out / "tokenizer.json").exists()


def test_lr_schedule_warmup_and_decay():
    opt = OptimizerConfig(lr=1.0, warmup_steps=2, schedule="linear", min_lr_ratio=0.1)
    f = lr_lambda(opt, total_steps=12)
    assert [round(f(s), 3) for s in (0, 1, 2, 7, 12, 20)] == [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    cos = lr_lambda(OptimizerConfig(lr=1.0, schedule="cosine"), total_steps=10)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)


@pytest.mark.parametrize("estimator", ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_every_estimator_trains_toward_rewarded_samples(demo_inputs, estimator):
    """Two prompts, two samples each, the right one scored 1: whichever estimator turns the scores into
    advantages (controller.advantages -> keel.algo), the update makes the right answers likelier."""
    from keel.controller.advantages import add_advantages

    critic = estimator == "gae"
    algo = AlgorithmConfig(estimator=estimator, mini_batch_size=4, ppo_epochs=1, kl=KLConfig(coef=0.01))
    # a small step: Adam's first steps move every weight by about lr, and the test is about direction
    learner_cfg = LearnerConfig(micro_batch_size=2, optimizer=OptimizerConfig(lr=1e-4))
    plan = LearnerPlan(temperature=1.0, use_critic=critic, total_optimizer_steps=10)
    policy, _ = demo_inputs  # warmed up: it writes numbers, so answers are distinct sequences
    learner = Learner(ModelConfig(policy=str(policy)), learner_cfg, algo, plan)
    tok = load_tokenizer(str(policy))
    traj = _batch(tok, PAIRS).with_fields(prompt_ids=["a", "a", "b", "b"], sample_index=[0, 1, 0, 1])
    old, values = learner.old_logprobs_and_values(traj)
    scored = traj.with_fields(
        scores=torch.tensor([1.0, 0.0, 1.0, 0.0]), old_logprobs=old, ref_logprobs=old.clone(), values=values
    )
    scored = add_advantages(scored, algo, kl_coef=0.01)
    metrics = learner.update(scored)
    assert all(v == v for v in metrics.values()), metrics
    new, _ = learner.old_logprobs_and_values(traj)
    gain = ((new - old) * traj.response_mask).sum(-1)
    assert gain[[0, 2]].min() > 0 > gain[[1, 3]].max(), (estimator, gain)


def test_mixed_precision_keeps_float32_weights_and_the_reference_agrees(tiny_model_dir):
    """model.precision mixed: bfloat16 matmuls, float32 weights, gradients and optimizer state.
    The learner's and the reference's log-probs of the same weights agree exactly (the KL starts at
    0, as in float32), sit within bfloat16 rounding of the float32 ones, and the rollout is sent
    bfloat16 weights when plan.weights_dtype says so."""
    from keel.reference.model import ReferenceModel

    algo = AlgorithmConfig(estimator="grpo", mini_batch_size=4, ppo_epochs=1, kl=KLConfig(coef=0.1, placement="loss"))
    learner_cfg = LearnerConfig(micro_batch_size=2, optimizer=OptimizerConfig(lr=1e-3))
    plan = LearnerPlan(temperature=1.0, use_critic=False, total_optimizer_steps=2, weights_dtype="bfloat16")
    model = ModelConfig(policy=str(tiny_model_dir), precision="mixed")
    learner = Learner(model, learner_cfg, algo, plan)
    tok = load_tokenizer(str(tiny_model_dir))
    traj = _batch(tok, PAIRS)
    mixed, _ = learner.old_logprobs_and_values(traj)
    reference = ReferenceModel(str(tiny_model_dir), precision="mixed").logprobs(traj)
    full = ReferenceModel(str(tiny_model_dir)).logprobs(traj)
    mask = traj.response_mask
    assert torch.equal(mixed, reference)
    gap = (mixed - full)[mask].abs().max().item()
    assert 0 < gap < 0.1, gap  # bfloat16 compute really ran, and stayed close

    adv = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1) * mask.float()
    metrics, logprobs = learner.update_on_policy(traj.with_fields(advantages=adv, ref_logprobs=reference))
    assert torch.equal(logprobs, mixed) and metrics["kl/mean"] == 0.0
    after, _ = learner.old_logprobs_and_values(traj)
    gain = ((after - mixed) * mask).sum(-1)
    assert gain[[0, 2]].min() > 0 > gain[[1, 3]].max(), gain  # gradients reached the float32 weights
    assert all(p.dtype == torch.float32 for p in learner.policy.module.parameters())
    assert all(p.dtype == torch.float32 for p in learner.policy_state().values())
    exported = learner.export_weights()
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="model.dtype must be float32"):
        ModelConfig(policy="p", dtype="bfloat16", precision="mixed")
