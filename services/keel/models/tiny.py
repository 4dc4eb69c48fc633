"""Tiny Llama models with a locally trained tokenizer, so demos and tests never need a model hub.

    keel make-tiny-model runs/tiny                  # causal LM
    keel make-tiny-model runs/tiny-rm --reward      # same body, one-logit sequence-classification head

The model is a real Llama (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention) that
vLLM, transformers and DeepSpeed all load like any HF checkpoint. head_dim defaults to 64:
vLLM's CPU attention refuses head sizes below 32. Weights are random (seeded); the tokenizer is
a byte-level BPE trained on a built-in corpus of arithmetic and plain English (or yours).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# A deliberately plain template: role tags then content, one turn per line.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a cat dog sat on mat and is was what how many plus minus times equals answer question "
    "one two three four five six seven eight nine ten zero yes no good bad hello world please "
    "thank you user assistant system say repeat count add sum result number word letter"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    """Architecture of a tiny Llama. hidden_size / num_heads is the head dim (keep it >= 32)."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim < 32:
            raise ValueError(f"head_dim {self.head_dim} < 32: vLLM's CPU attention refuses it (use 64)")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size {self.vocab_size} < 300: the byte-level alphabet alone takes 256 ids")


def default_corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Arithmetic facts, counting and short English sentences: what the demo tasks speak."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.5:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice(["+", "-"])
            out.append(f"{a}{op}{b}={a + b if op == '+' else a - b}")
        elif kind < 0.7:
            start = rng.randint(0, 90)
            out.append(" ".join(str(start + i) for i in range(rng.randint(2, 8))))
        else:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))))
    return out


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `corpus`, wrapped as an HF fast tokenizer with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits split one per token so arithmetic is learnable; then byte-level on the rest.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_model(
    out_dir: str | Path,
    spec: TinyModelSpec | None = None,
    *,
    reward: bool = False,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    pretrain_steps: int = 0,
) -> Path:
    """Write a tiny Llama (causal LM, or a one-logit reward model) plus tokenizer to `out_dir`.

    Same arguments, same files: the tokenizer training and the weight init are seeded.
    `pretrain_steps` > 0 warms the causal LM up on the corpus (see `pretrain`).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    spec = spec or TinyModelSpec()
    spec.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus) if corpus is not None else default_corpus(seed)
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    if reward:
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    if pretrain_steps and not reward:
        pretrain(model, tokenizer, corpus, pretrain_steps, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def pretrain(
    model, tokenizer, corpus: list[str], steps: int, seed: int, batch_size: int = 64, lr: float = 3e-3
) -> float:
    """A short causal-LM warm-up on the corpus (plain torch, seconds on CPU): the demo policy then
    writes text of the task's shape instead of noise. Returns the last loss."""
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        lines = [rng.choice(corpus) for _ in range(batch_size)]
        batch = tokenizer([line + tokenizer.eos_token for line in lines], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()
