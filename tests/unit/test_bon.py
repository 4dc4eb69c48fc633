"""keel bon's selection into dataset rows, its summary and curve, and the atomic write, on
hand-made batches (the run on real roles is tests/integration/test_bon.py)."""

from __future__ import annotations

import json

import pytest
import torch

from keel.bon import Tally, best_of_k_curve, format_curve, sample_grid, write_rows
from keel.config import BestOfNConfig
from keel.data.prompts import Prompt
from keel.trajectory import Trajectories


def scored(samples: list[tuple[str, int, str, float]]) -> Trajectories:
    """A scored batch of (prompt id, sample index, response, score) rows, in the order given."""
    B = len(samples)
    return Trajectories(
        rollout_id="r",
        weight_version=0,
        prompt_ids=[s[0] for s in samples],
        sample_index=[s[1] for s in samples],
        prompt_tokens=torch.ones(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_tokens=torch.ones(B, 1, dtype=torch.long),
        response_mask=torch.ones(B, 1, dtype=torch.bool),
        behaviour_logprobs=torch.zeros(B, 1),
        prompts=[f"text of {s[0]}" for s in samples],
        responses=[s[2] for s in samples],
        metadata=[{"answer": s[0]} for s in samples],
        scores=torch.tensor([s[3] for s in samples]),
    )


# two prompts x 3 samples, out of order as workers return them; "b" has a tie and a blank best
BATCH = [
    ("b", 2, "b2", 0.9),
    ("a", 0, "a0", 0.2),
    ("b", 0, "b0", 0.5),
    ("a", 1, "a1", 0.7),
    ("b", 1, "  ", 1.5),
    ("a", 2, "a2", 0.7),
]
PROMPTS = [Prompt("a", "A?", (1,)), Prompt("b", "B?", (2,))]
TEXTS = {"a": "raw a", "b": "raw b"}


def test_sample_grid_orders_prompts_and_samples():
    order, grid = sample_grid([s[0] for s in BATCH], [s[1] for s in BATCH], 3)
    assert order == ["b", "a"] and grid.tolist() == [[2, 4, 0], [1, 3, 5]]
    order, grid = sample_grid([s[0] for s in BATCH], [s[1] for s in BATCH], 3, ["a", "b"])
    assert order == ["a", "b"] and grid.tolist() == [[1, 3, 5], [2, 4, 0]]
    with pytest.raises(ValueError, match="prompt a: fewer than 4 samples"):
        sample_grid(["a"] * 3, [0, 1, 2], 4)
    with pytest.raises(ValueError, match="prompt a: sample 1 is not one of 2 distinct samples"):
        sample_grid(["a", "a"], [1, 1], 2)


def test_keep_best_writes_each_prompts_best_non_blank_answer_in_prompt_order():
    tally = Tally()
    tally.add(scored(BATCH), PROMPTS, TEXTS, BestOfNConfig(n=3))
    rows = tally.rows
    # a: 0.7 twice, the first sampled wins; b: the blank 1.5 is never kept, so 0.9
    assert [(r["prompt_id"], r["sample"], r["response"], r["score"]) for r in rows] == [
        ("a", 1, "a1", pytest.approx(0.7)),
        ("b", 2, "b2", pytest.approx(0.9)),
    ]
    assert rows[0]["prompt"] == "raw a" and rows[0]["metadata"] == {"answer": "a"}
    s = tally.summary(3)
    assert (s["prompts"], s["samples"], s["rows"], s["prompts_kept"], s["blank_responses"]) == (2, 6, 2, 2, 1)
    assert s["mean_score"] == pytest.approx(sum(b[3] for b in BATCH) / 6)
    assert s["mean_best_score"] == pytest.approx((0.7 + 1.5) / 2)  # the best of n, blank or not
    assert s["mean_kept_score"] == pytest.approx((0.7 + 0.9) / 2)
    assert s["bon@1/reward"] == pytest.approx((0.2 + 0.5) / 2) and s["bon@3/reward"] == s["mean_best_score"]


def test_keep_threshold_keeps_every_answer_at_or_above_it():
    tally = Tally()
    tally.add(scored(BATCH), PROMPTS, TEXTS, BestOfNConfig(n=3, keep="threshold", threshold=0.7))
    assert [(r["prompt_id"], r["sample"]) for r in tally.rows] == [("a", 1), ("a", 2), ("b", 2)]
    more = [Prompt("c", "C?", (3,)), Prompt("d", "D?", (4,))]
    batch = scored([(p.prompt_id, j, f"x{j}", 0.0) for p in more for j in range(3)])
    tally.add(batch, more, {"c": "raw c", "d": "raw d"}, BestOfNConfig(n=3))
    s = tally.summary(3)  # two rounds: prompts and the curve add up over both
    assert (s["prompts"], s["samples"]) == (4, 12)
    assert s["bon@3/reward"] == pytest.approx((0.7 + 1.5 + 0 + 0) / 4)


def test_curve_from_a_batch_and_its_table():
    traj = scored(BATCH)
    task = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]  # per sample, batch order
    curve = best_of_k_curve(traj, traj.scores, task, 3)
    assert sorted(curve) == sorted(
        f"bon@{k}/{m}{u}" for k in (1, 2, 3) for m in ("reward", "task_metric") for u in ("", "_unbiased")
    )
    assert curve["bon@1/task_metric"] == 0.0  # a0 and b0: wrong
    assert curve["bon@3/task_metric"] == 1.0  # a1 (the first 0.7) and b1: the curve picks by score alone
    assert curve["bon@1/task_metric_unbiased"] == pytest.approx(0.5)  # the mean over all samples
    table = format_curve(curve, 3)
    assert table[0].split() == ["best", "of", "k", "k=1", "k=2", "k=3"]
    assert [line.split()[0] for line in table[1:]] == ["reward", "(all", "task", "(all"]


def test_write_rows_replaces_the_file_whole(tmp_path):
    path = tmp_path / "out" / "bon.jsonl"
    write_rows([{"prompt": "1+1=", "response": "2"}], path)
    write_rows([{"prompt": "2+2=", "response": "4"}, {"prompt": "3+3=", "response": "6"}], path)
    assert [json.loads(line)["response"] for line in path.read_text().splitlines()] == ["4", "6"]
    assert [p.name for p in path.parent.iterdir()] == ["bon.jsonl"]
