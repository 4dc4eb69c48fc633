"""PNG curves of any run's metrics.jsonl: `keel plot RUN_DIR`, and `keel train` at the end of a run.

One figure per group that has data: reward, KL, losses, response lengths, step time by phase
(stacked), and whatever an offline trainer logs (sft/, rm/, dpo/ and their eval/ lines). A metric
is drawn against `step`; held-out evaluation lines (eval/...) are drawn as markers on the same
axes as their training counterpart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class NoMetrics(ValueError):
    """The run directory has no metrics to plot; says where it looked."""


# figure -> metric keys (those present are drawn; a figure with none is skipped)
GROUPS: dict[str, list[str]] = {
    "reward": ["reward_mean", "eval/reward_mean", "eval/task_metric"],
    "kl": ["kl", "eval/kl", "kl_coef"],
    "losses": ["policy/loss", "value/loss", "kl/loss", "policy/entropy"],
    "policy": ["policy/clip_frac", "policy/approx_kl", "policy/grad_norm", "value/explained_var"],
    "lengths": ["response_length", "eval/response_length"],
    "sft": ["sft/loss", "eval/sft/loss", "sft/accuracy"],
    "rm": ["rm/loss", "rm/accuracy", "eval/rm/accuracy"],
    "dpo": ["dpo/loss", "dpo/accuracy", "eval/dpo/accuracy"],
}


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl (a torn last line, from a crash mid-write, is left out)."""
    lines = []
    for raw in Path(path).read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def _points(history: list[dict], key: str) -> tuple[list, list]:
    pts = [(m["step"], m[key]) for m in history if isinstance(m.get(key), int | float) and math.isfinite(m[key])]
    return ([s for s, _ in pts], [v for _, v in pts]) if pts else ([], [])


def plot_groups(history: list[dict], groups: dict[str, list[str]], out: Path, title: str) -> list[Path]:
    """One PNG per group with any data, a panel per metric present; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group, keys in groups.items():
        present = [k for k in keys if _points(history, k)[0]]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
        for ax, key in zip(axes[0], present, strict=True):
            steps, values = _points(history, key)
            ax.plot(steps, values, marker="o" if key.startswith("eval/") or len(steps) < 30 else None)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{title}: {group}")
        fig.tight_layout()
        path = out / f"{group}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_phases(history: list[dict], out: Path, title: str) -> Path | None:
    """Step time by phase (time/rollout, time/score, ...) stacked, per step; None without them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in history if any(k.startswith("time/") for k in m)]
    if not steps:
        return None
    phases = [k for k in steps[0] if k.startswith("time/")]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.stackplot(
        [m["step"] for m in steps],
        [[m.get(p) or 0.0 for m in steps] for p in phases],
        labels=[p.removeprefix("time/") for p in phases],
    )
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(loc="upper left", fontsize=7, ncols=len(phases))
    ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: step time by phase")
    fig.tight_layout()
    path = out / "step_time.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Every figure of the run in `run_dir` (its metrics.jsonl) into `out` (default run_dir/plots)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise NoMetrics(f"{run_dir}: no metrics.jsonl (is it a keel train, sft, rm or dpo run directory?)")
    history = [m for m in read_metrics(metrics) if isinstance(m.get("step"), int)]
    if not history:
        raise NoMetrics(f"{metrics}: no metrics lines yet")
    out = Path(out) if out is not None else run_dir / "plots"
    written = plot_groups(history, GROUPS, out, run_dir.name)
    phases = plot_phases(history, out, run_dir.name)
    return written + ([phases] if phases else [])
