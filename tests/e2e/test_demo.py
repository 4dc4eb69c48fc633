"""`keel demo --quick` end to end: base -> SFT -> RM -> PPO (and DPO), evaluated on held-out prompts.

Seen on this 2-core machine (--quick, HF rollout): task accuracy base 0.00, SFT 0.55, PPO 0.78,
reward model 0.97 of held-out pairs; about 65 s. The test asks PPO to beat SFT by 0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keel.config import CONFIG_KINDS, load_config

KEEL = shutil.which("keel", path=str(Path(sys.executable).parent)) or "keel"


def test_demo_pipeline_each_stage_helps(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [KEEL, "demo", "--quick", "--backend", "hf", "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout[-1500:])
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["stage"]: r for r in summary["rows"]}
    assert list(rows) == ["base", "sft", "ppo", "dpo"]
    assert rows["sft"]["task_accuracy"] > rows["base"]["task_accuracy"] + 0.3
    assert rows["ppo"]["task_accuracy"] > rows["sft"]["task_accuracy"] + 0.1  # the bar: PPO beats SFT
    assert summary["rm_heldout_pair_accuracy"] > 0.85 and summary["rm_top1_facts"] > 60
    assert rows["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4) and rows["ppo"]["kl_to_sft"] > 0
    assert rows["ppo"]["win_rate_vs_sft"] > 0.5
    assert "| stage | task accuracy (T=1) |" in proc.stdout and "| ppo |" in proc.stdout

    for stage in ("ppo", "sft", "rm", "dpo"):
        assert (out / "plots" / f"{stage}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for model in ("base", "sft", "rm", "dpo", "ppo/checkpoints/final"):
        assert (out / model / "model.safetensors").exists(), model
    assert len(json.loads((out / "eval.json").read_text())["checkpoints"]) == 4
    assert (out / "eval_greedy.json").exists()
    for stage, kind in (("sft", "sft"), ("rm", "rm"), ("dpo", "dpo"), ("eval", "eval"), ("ppo", "train")):
        load_config(out / "configs" / f"{stage}.yaml", CONFIG_KINDS[kind])  # each stage can be re-run
