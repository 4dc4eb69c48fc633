"""Synthetic tasks with answers a person can check, for demos and tests."""

from __future__ import annotations

import json
import random
from pathlib import Path


def arithmetic_rows(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """{"prompt": "3+4=", "answer": "7"} rows with operands in [0, max_operand]."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"id": f"add-{seed}-{i}", "prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
