"""`keel bon` on real roles: a local Ray, HF rollout workers and a reward actor started as keel train
starts them. On the demo task, with the task-correctness reward, the best of 8 samples beats one
sample and each prompt keeps its best answer. (tests/unit/test_cli.py runs keel bon, then keel sft
on its output.)

Seen on this 2-core machine (the warmed-up base model, 256 prompts): task accuracy 0.014 per sample,
0.11 for the best of 8; about 20 s.
"""

from __future__ import annotations

import json

import pytest

from keel.config import BonConfig

EXACT = "keel.reward.rules:arithmetic_exact"  # 1 for exactly the right sum, else 0: the task's accuracy


def test_best_of_8_beats_best_of_1_and_each_prompt_keeps_its_best_answer(demo_inputs, ray_session, tmp_path):
    from keel.bon import run_bon
    from keel.reward.rules import arithmetic_exact

    policy, prompts = demo_inputs
    cfg = BonConfig.model_validate(
        {
            "model": {"policy": str(policy), "max_prompt_tokens": 16},
            "data": {"prompts": str(prompts), "metadata_fields": ["answer"]},
            "rollout": {
                "backend": "hf",
                "replicas": 2,
                "resources": {"num_cpus": 0.25},
                "sampling": {"temperature": 1.0, "max_new_tokens": 4},
            },
            "reward": {"source": {"type": "function", "function": EXACT}, "resources": {"num_cpus": 0.25}},
            "bon": {"n": 8, "max_prompts": 256, "prompts_per_round": 128},
        }
    )
    out = tmp_path / "bon" / "bon.jsonl"
    lines: list[str] = []
    summary = run_bon(cfg, out, log=lines.append)

    assert (summary["prompts"], summary["samples"], summary["n"]) == (256, 2048, 8)
    # the reward is the task metric, so the curve of its mean is task accuracy against samples drawn
    assert summary["bon@8/reward"] > summary["bon@1/reward"]
    assert summary["bon@8/reward_unbiased"] > summary["bon@1/reward_unbiased"] > 0
    assert summary["bon@1/reward_unbiased"] == pytest.approx(summary["mean_score"])
    assert summary["bon@8/reward"] == pytest.approx(summary["mean_best_score"])

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p.name for p in out.parent.iterdir()) == ["bon.jsonl"]  # no temporary file left
    ids = [row["prompt_id"] for row in rows]
    assert ids == sorted(set(ids), key=int)  # one row per prompt, in the prompt file's order
    assert len(rows) == summary["rows"] == summary["prompts_kept"] >= 256 - summary["blank_responses"] // 8
    for row in rows:
        assert set(row) == {"prompt_id", "prompt", "response", "score", "sample", "metadata"}
        assert row["response"].strip() and 0 <= row["sample"] < 8
        a, b = row["prompt"].removesuffix("=").split("+")
        assert row["metadata"] == {"answer": str(int(a) + int(b))}
    # each kept answer is its prompt's best: right exactly where one of its 8 samples was right
    right = arithmetic_exact([r["prompt"] for r in rows], [r["response"] for r in rows], [r["metadata"] for r in rows])
    assert [r["score"] for r in rows] == right
    assert sum(right) / summary["prompts"] == pytest.approx(summary["mean_best_score"])
    assert any("best of k" in line for line in lines) and any("kept 2" in line for line in lines)
