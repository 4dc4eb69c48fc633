"""The learner with model.lora, on CPU (gloo), without Ray: only the adapters train and go to the
optimizer, the reference is the policy with its adapter off (KL exactly 0 at step 0), a weight export
is the adapters alone, and a checkpoint keeps adapters and optimizer state."""

from __future__ import annotations

import pytest
import torch

from keel.config import AlgorithmConfig, DeepSpeedConfig, KLConfig, LearnerConfig, LoraConfig, ModelConfig
from keel.config import OptimizerConfig as Opt
from keel.learner.learner import Learner, LearnerPlan
from keel.models.loading import load_tokenizer
from keel.models.lora import LORA_A, LORA_B, SCALING
from keel.reference.model import ReferenceModel
from unit.learner.test_learner import PAIRS, _batch

ADV = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1)


def _lora_learner(model_dir, zero=0, lr=1e-2, rank=4, dtype="float32"):
    algo = AlgorithmConfig(estimator="grpo", mini_batch_size=4, ppo_epochs=1, kl=KLConfig(coef=0.1, placement="loss"))
    learner = LearnerConfig(micro_batch_size=2, deepspeed=DeepSpeedConfig(zero_stage=zero), optimizer=Opt(lr=lr))
    plan = LearnerPlan(temperature=1.0, use_critic=False, total_optimizer_steps=10, weights_dtype=dtype)
    model = ModelConfig(policy=str(model_dir), dtype=dtype, lora=LoraConfig(rank=rank, alpha=2 * rank))
    return Learner(model, learner, algo, plan)


@pytest.mark.parametrize("zero", [0, 2])
def test_adapters_alone_train_and_the_reference_is_the_adapter_off(tiny_model_dir, zero):
    learner = _lora_learner(tiny_model_dir, zero=zero)
    optimized = [p for group in learner.policy.optimizer.param_groups for p in group["params"]]
    trainable = [p for p in learner.policy.module.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * 4 * 2 * 4 * 128  # 2 layers x q/k/v/o x (A + B)
    if zero == 0:  # ZeRO 2 optimizes flat partitions of the same parameters
        assert {id(p) for p in optimized} == {id(p) for p in trainable}
    tok = load_tokenizer(str(tiny_model_dir))
    traj = _batch(tok, PAIRS)
    base = ReferenceModel(str(tiny_model_dir)).logprobs(traj)
    old, _ = learner.old_logprobs_and_values(traj)
    ref = learner.reference_logprobs(traj)
    assert torch.equal(ref, old) and torch.equal(ref, base)  # step 0: KL exactly 0
    frozen = {n: p.detach().clone() for n, p in learner.policy.module.named_parameters() if not p.requires_grad}

    mask = traj.response_mask.float()
    metrics, logprobs = learner.update_on_policy(traj.with_fields(advantages=ADV * mask, ref_logprobs=ref))
    assert torch.equal(logprobs, ref) and metrics["kl/mean"] == 0.0
    assert metrics["params/trainable"] == 2 * 4 * 2 * 4 * 128 and metrics["params/total"] > 100 * 2 * 4 * 2 * 4
    after, _ = learner.old_logprobs_and_values(traj)
    gain = ((after - old) * mask).sum(-1)
    assert gain[[0, 2]].min() > 0 > gain[[1, 3]].max(), gain  # the adapters learned
    assert torch.equal(learner.reference_logprobs(traj), base)  # the reference did not move
    assert all(torch.equal(p, frozen[n]) for n, p in learner.policy.module.named_parameters() if n in frozen)


def test_export_is_the_adapters_and_save_hf_writes_adapter_and_merged(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = _lora_learner(tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    traj = _batch(tok, PAIRS)
    mask = traj.response_mask.float()
    learner.update_on_policy(traj.with_fields(advantages=ADV * mask, ref_logprobs=torch.zeros_like(mask)))
    state = learner.export_weights()
    assert set(state) == {SCALING} | {
        f"model.layers.{i}.self_attn.{p}{ab}"
        for i in (0, 1)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for ab in (LORA_A, LORA_B)
    }
    assert sum(t.numel() for t in state.values()) == 2 * 4 * 2 * 4 * 128 + 1
    assert any(t.abs().sum() > 0 for k, t in state.items() if k.endswith(LORA_B))  # trained away from 0
    merged = learner.policy_state()
    assert "model.layers.0.self_attn.q_proj.weight" in merged and not any("lora" in k for k in merged)

    out = learner.save_hf(tmp_path / "final")
    ids = traj.input_ids
    with torch.no_grad():
        want = learner.policy.module(ids).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)(ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(out / "merged")
        torch.testing.assert_close(merged_model(ids).logits, want, atol=1e-5, rtol=0)
    assert torch.equal(adapter, want)
    assert all(torch.equal(merged_model.state_dict()[k], v) for k, v in merged.items())


def test_checkpoint_keeps_adapters_and_optimizer_state(tiny_model_dir, tmp_path):
    """Two updates straight, or one, a checkpoint, a fresh learner restored from it, and the second:
    the same adapters. The checkpoint leaves out the frozen base."""
    tok = load_tokenizer(str(tiny_model_dir))
    traj = _batch(tok, PAIRS)
    batch = traj.with_fields(
        advantages=ADV * traj.response_mask.float(), ref_logprobs=torch.zeros(traj.response_mask.shape)
    )
    straight = _lora_learner(tiny_model_dir)
    straight.update_on_policy(batch)
    straight.update_on_policy(batch)

    first = _lora_learner(tiny_model_dir)
    first.update_on_policy(batch)
    first.save_checkpoint(str(tmp_path))
    saved = sum(f.stat().st_size for f in (tmp_path / "policy").rglob("*") if f.is_file())
    full = sum(p.numel() * 4 for p in first.policy.module.parameters())
    assert saved < full / 2, (saved, full)  # adapters and their Adam moments, not the base
    resumed = _lora_learner(tiny_model_dir)
    assert resumed.load_checkpoint(str(tmp_path)) == 1
    resumed.update_on_policy(batch)
    a, b = straight.export_weights(), resumed.export_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = ReferenceModel(str(tiny_model_dir)).logprobs(traj)
    assert torch.equal(resumed.reference_logprobs(traj), base)
