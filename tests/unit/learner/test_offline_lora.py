"""keel sft and keel dpo with model.lora: only the adapters train, the output is the PEFT adapter
and the merged model (same logits), a crashed run resumes bit for bit, and DPO's reference is the
adapter-off model loaded once."""

from __future__ import annotations

import pytest
import torch

from keel.config import DPOConfig, SFTConfig
from keel.learner.dpo import DPOTrainer
from keel.learner.offline import run_offline
from keel.learner.sft import SFTTrainer
from unit.learner.offline_helpers import pair_data, sft_data, trainer

LORA = {"rank": 8, "alpha": 16, "dropout": 0.05}
ADAPTER_PARAMS = 2 * 4 * 2 * 8 * 128  # 2 layers x q/k/v/o x (A + B), rank 8, hidden 128


def _load_both(policy, out):
    """The adapter on its base, and the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy), out).eval()
    return adapter, AutoModelForCausalLM.from_pretrained(out / "merged").eval()


def test_lora_sft_trains_adapters_and_writes_adapter_and_merged(demo_inputs, tmp_path):
    policy, _ = demo_inputs
    cfg = SFTConfig.model_validate(
        {
            "model": {"path": str(policy), "lora": LORA},
            "data": {"path": str(sft_data(tmp_path)), "eval_fraction": 0.125, "max_tokens": 16},
            "trainer": trainer(lr=5e-3),
            "train": {"epochs": 2, "batch_size": 32},
        }
    )
    history, _ = run_offline(SFTTrainer, cfg, tmp_path / "out")
    train = [m for m in history if "sft/loss" in m]
    evals = [m["eval/sft/loss"] for m in history if "eval/sft/loss" in m]
    assert sum(m["sft/loss"] for m in train[-3:]) < 0.8 * sum(m["sft/loss"] for m in train[:3]), train
    assert evals[-1] < evals[0], evals
    assert train[0]["params/trainable"] == ADAPTER_PARAMS and train[0]["params/total"] > 10 * ADAPTER_PARAMS

    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists() and (out / "merged" / "model.safetensors").exists()
    adapter, merged = _load_both(policy, out)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-5, rtol=0)
        with adapter.disable_adapter():
            base_logits = adapter(ids).logits
        assert (merged(ids).logits - base_logits).abs().max() > 1e-3


def test_an_interrupted_lora_sft_run_resumed_equals_a_straight_one(tiny_model_dir, tmp_path):
    """Adapters and their optimizer state come back from the checkpoint (the frozen base is not in it)."""
    from safetensors.torch import load_file

    from keel.controller.checkpoint import CheckpointStore

    settings = {
        "model": {"path": str(tiny_model_dir), "lora": {"rank": 4, "alpha": 8}},
        "data": {"path": str(sft_data(tmp_path, rows=32)), "eval_fraction": 0.125, "max_tokens": 16},
        "trainer": trainer(micro=4, lr=5e-3),
        "train": {"epochs": 2, "batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 1},
    }
    cfg = SFTConfig.model_validate(settings)
    run_offline(SFTTrainer, cfg, tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash(m: dict) -> None:
        if m.get("step") == 3 and "sft/loss" in m:
            raise Crash

    with pytest.raises(Crash):
        run_offline(SFTTrainer, cfg, tmp_path / "resumed", crash)
    latest = CheckpointStore(tmp_path / "resumed" / "checkpoints", 1).latest()
    assert (latest / "hf" / "adapter_model.safetensors").exists() and (latest / "hf" / "merged").is_dir()
    run_offline(SFTTrainer, cfg, tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_dpo_reference_is_the_adapter_off_model_loaded_once(demo_inputs, tmp_path, monkeypatch):
    import keel.learner.dpo as dpo
    from keel.models.loading import response_logprobs

    policy, _ = demo_inputs
    train, held = pair_data(tmp_path, rows=384, held_out=64)
    cfg = DPOConfig.model_validate(
        {
            "model": {"path": str(policy), "lora": {"rank": 8, "alpha": 16}},
            "data": {"path": str(train), "eval_path": str(held), "max_tokens": 16},
            "trainer": trainer(micro=32, lr=5e-3),
            "train": {"epochs": 1, "batch_size": 32, "max_steps": 12, "eval_every": 6},
        }
    )
    loads = []
    load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *a, **k: loads.append(a) or load(*a, **k))
    t = DPOTrainer(cfg)
    assert len(loads) == 1  # scored the pairs, then became the base the adapters wrap
    with torch.no_grad(), t.engine.module.disable_adapter():
        for item in t.train_items[:4]:
            pair = item.pair
            ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
            lp = response_logprobs(t.engine.module, ids, torch.ones_like(ids), len(pair.prompt_ids))
            assert item.ref_chosen == pytest.approx(lp.sum().item(), abs=1e-4)
    history = t.fit(tmp_path / "dpo")
    steps = [m for m in history if "dpo/loss" in m]
    evals = [m for m in history if "eval/dpo/accuracy" in m]
    assert steps[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-3)  # adapter at 0: policy == reference
    assert steps[-1]["dpo/loss"] < steps[0]["dpo/loss"], [m["dpo/loss"] for m in steps]
    assert evals[-1]["eval/dpo/accuracy"] > 0.6 and steps[0]["params/trainable"] == ADAPTER_PARAMS
    adapter, merged = _load_both(policy, tmp_path / "dpo")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-5, rtol=0)
