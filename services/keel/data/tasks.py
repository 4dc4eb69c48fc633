"""Synthetic tasks with answers a person can check, for demos and tests.

Single-digit addition: the prompt is "a+b=", the answer a+b. Besides PPO prompts, the task makes
the data of every other stage: SFT demonstrations (a share of them wrong, as human demonstrations
are) and preference pairs (the right sum preferred over a wrong one or over text).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_JUNK = ["cat", "yes", "no", "the", "hello", "+", "=", "sum", "a"]


def _operands(rng: random.Random, max_operand: int) -> tuple[int, int]:
    return rng.randint(0, max_operand), rng.randint(0, max_operand)


def arithmetic_rows(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """{"prompt": "3+4=", "answer": "7"} rows with operands in [0, max_operand]."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = _operands(rng, max_operand)
        rows.append({"id": f"add-{seed}-{i}", "prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def wrong_answer(rng: random.Random, answer: int) -> str:
    """A plausible wrong sum: off by a few, never negative, never the answer."""
    while True:
        guess = answer + rng.choice([-3, -2, -1, 1, 2, 3, rng.randint(-9, 9)])
        if guess != answer and guess >= 0:
            return str(guess)


def arithmetic_sft_rows(n: int, seed: int = 0, wrong_share: float = 0.0, max_operand: int = 9) -> list[dict]:
    """{"prompt": "3+4=", "response": "7", "answer": "7"} demonstrations; `wrong_share` of them give a
    wrong sum (imperfect demonstrators), so a policy imitating them is right about 1 - wrong_share."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = _operands(rng, max_operand)
        response = wrong_answer(rng, a + b) if rng.random() < wrong_share else str(a + b)
        rows.append({"id": f"sft-{seed}-{i}", "prompt": f"{a}+{b}=", "response": response, "answer": str(a + b)})
    return rows


def arithmetic_preference_rows(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """{"prompt", "chosen", "rejected", "margin"} pairs: the right sum preferred over

    - a near miss (30%) or any other possible sum (30%), so that the right sum ends up above every
      wrong one, not only above the usual mistakes (margin 1);
    - the right sum with a digit glued on ("15" -> "154", 20%): without these a policy learns that
      a reward model which never saw such answers rates them like the sum they start with
      (margin 1);
    - text that is no number at all (20%, margin 2).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = _operands(rng, max_operand)
        kind, margin = rng.random(), 1.0
        if kind < 0.3:
            rejected = wrong_answer(rng, a + b)
        elif kind < 0.6:
            rejected = str(rng.choice([s for s in range(2 * max_operand + 1) if s != a + b]))
        elif kind < 0.8:
            rejected = f"{a + b}{rng.randint(0, 9)}"
        else:
            rejected, margin = rng.choice(_JUNK), 2.0
        rows.append(
            {
                "id": f"pair-{seed}-{i}",
                "prompt": f"{a}+{b}=",
                "chosen": str(a + b),
                "rejected": rejected,
                "margin": margin,
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
