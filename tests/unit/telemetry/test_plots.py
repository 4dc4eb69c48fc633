"""`keel plot` and keel.telemetry.plots on metrics.jsonl files shaped like a train run's and an
offline trainer's: the figures with data are written as PNGs, the others are not, and a torn
last line or a null value changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keel.telemetry.plots import NoMetrics, plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def _write(run_dir: Path, lines: list[dict], torn: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(m) + "\n" for m in lines)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 9, "reward_me' if torn else ""))
    return run_dir


def _train_lines(steps: int = 6) -> list[dict]:
    lines = []
    for s in range(steps):
        lines.append(
            {
                "step": s,
                "reward_mean": 0.1 * s,
                "kl": 0.01 * s,
                "policy/loss": -0.1,
                "value/loss": None if s == 2 else 0.5,  # NaN is written as null
                "response_length": 3.0,
                "time/rollout": 1.0,
                "time/score": 0.5,
                "time/update": 2.0,
            }
        )
        if s % 3 == 2:
            lines.append({"step": s + 1, "eval/reward_mean": 0.2, "eval/kl": 0.02, "eval/response_length": 3.0})
    return lines


def test_a_train_run_gets_its_figures(tmp_path):
    run = _write(tmp_path / "run", _train_lines(), torn=True)
    written = plot_run(run)
    names = sorted(p.name for p in written)
    assert names == ["kl.png", "lengths.png", "losses.png", "reward.png", "step_time.png"]
    assert all(p.parent == run / "plots" and p.read_bytes()[:8] == PNG for p in written)


def test_an_offline_run_gets_only_its_own_figures(tmp_path):
    lines = [{"step": s, "sft/loss": 2.0 - 0.1 * s, "sft/accuracy": 0.1 * s} for s in range(1, 8)]
    lines.append({"step": 7, "eval/sft/loss": 1.5})
    written = plot_run(_write(tmp_path / "sft", lines), tmp_path / "elsewhere")
    assert [p.name for p in written] == ["sft.png"] and written[0].parent == tmp_path / "elsewhere"


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(NoMetrics, match=r"no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(NoMetrics, match=r"no metrics lines yet"):
        plot_run(tmp_path)


def test_keel_plot_command(tmp_path):
    run = _write(tmp_path / "run", _train_lines())
    keel = [sys.executable, "-m", "keel.cli"]
    done = subprocess.run([*keel, "plot", str(run), "--out", str(tmp_path / "png")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(Path(x).name for x in done.stdout.split()) == sorted(p.name for p in (tmp_path / "png").iterdir())
    missing = subprocess.run([*keel, "plot", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr
