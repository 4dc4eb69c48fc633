"""The peer-comparison workload (issue 14), shared by Keel's side and TRL's side of
`benchmarks/peer_trl.py` so both train the same model on the same prompts with the same reward.

This module imports neither Keel nor TRL at module level: TRL's side runs it from its own
environment (`benchmarks/peer/trl_side.py`), where Keel is not installed.

The workload: a Llama of `SIZES[size]` (random weights, seeded, made by keel's tiny-model
builder), 256 prompts "i plus i+1 is", `prompts_per_step` prompts x `samples_per_prompt`
samples x `new_tokens` new tokens per step at temperature 1, a rule reward (the share of digits
in the response), GRPO advantages, KL 0.04 (k3, in the loss), lr 1e-4, one optimizer step per
batch (one epoch, one mini-batch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Model shapes: (layers, hidden, heads, intermediate, vocab). head_dim 64 everywhere (vLLM CPU).
SIZES: dict[str, dict[str, int]] = {
    "28m": {"num_layers": 8, "hidden_size": 512, "num_heads": 8, "num_kv_heads": 8, "intermediate_size": 1536},
    "100m": {"num_layers": 12, "hidden_size": 768, "num_heads": 12, "num_kv_heads": 12, "intermediate_size": 3072},
}
VOCAB = 512


@dataclass(frozen=True)
class Workload:
    size: str = "28m"
    prompts: int = 256
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    new_tokens: int = 32
    steps: int = 12  # steady state is measured over steps [warmup, steps)
    warmup: int = 2
    lr: float = 1e-4
    kl_coef: float = 0.04
    temperature: float = 1.0
    seed: int = 0

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))


def prompt_rows(n: int) -> list[dict[str, str]]:
    """The prompts: "i plus i+1 is" for i in 0..n-1 (the answer is kept as metadata)."""
    return [{"prompt": f"{i} plus {i + 1} is", "answer": str(2 * i + 1)} for i in range(n)]


def write_prompts(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(n)))
    return path


def digit_share(text: str) -> float:
    """The reward of one response: the share of its characters that are digits (0 when empty)."""
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def digit_reward(prompts: list[str], responses: list[str], metadata: list[dict[str, str]], **_: object) -> list[float]:
    """Keel's reward function signature (`reward.source.function: peer_workload:digit_reward`)."""
    return [digit_share(r) for r in responses]


def make_model(out_dir: Path, size: str, seed: int = 0) -> Path:
    """The workload's policy: a seeded random Llama of SIZES[size] with keel's local tokenizer."""
    from keel.models.tiny import TinyModelSpec, make_tiny_model

    spec = TinyModelSpec(vocab_size=VOCAB, max_position_embeddings=512, **SIZES[size])
    return make_tiny_model(out_dir, spec, seed=seed)


def steady_rate(step_times: list[float], batch: int, warmup: int) -> float:
    """Samples per second over the steps after `warmup` (total samples / total time)."""
    timed = step_times[warmup:]
    if not timed:
        raise ValueError(f"no steps after the first {warmup}: run more steps")
    return batch * len(timed) / sum(timed)
