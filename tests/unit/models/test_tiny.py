"""The tiny-model maker: real HF checkpoints that load, generate and train."""

import json

import pytest
import torch

from keel.models.tiny import TinyModelSpec, default_corpus, make_tiny_model


def test_checkpoint_is_hf_format_with_head_dim_64(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert (tiny_model_dir / "model.safetensors").exists()
    assert (tiny_model_dir / "tokenizer.json").exists()


def test_loads_generates_and_tokenizes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.tokenize("12+34=") == ["1", "2", "+", "3", "4", "="]  # digits one per token
    assert tok.decode(tok("the cat sat on the mat").input_ids) == "the cat sat on the mat"
    ids = tok("3+4=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 5) or tok.eos_token_id in out[0].tolist()
    assert tok.eos_token_id == model.config.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi\n<|assistant|>"


def test_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny_model(tmp_path / "a", TinyModelSpec(num_layers=1), seed=3)
    b = make_tiny_model(tmp_path / "b", TinyModelSpec(num_layers=1), seed=3)
    c = make_tiny_model(tmp_path / "c", TinyModelSpec(num_layers=1), seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_reward_variant_scores_one_float(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_tiny_model(tmp_path / "rm", TinyModelSpec(num_layers=1), reward=True)
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path)
    batch = tok(["1+1=2", "1+1=3 and more"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = rm(**batch).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


def test_one_training_step_lowers_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = tok(default_corpus(lines=8), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize(
    "spec, message",
    [
        (TinyModelSpec(num_heads=8), "head_dim 16 < 32"),
        (TinyModelSpec(hidden_size=129), "not divisible by num_heads"),
        (TinyModelSpec(num_kv_heads=3), "not divisible by num_kv_heads"),
        (TinyModelSpec(vocab_size=100), "vocab_size 100 < 300"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.check()
