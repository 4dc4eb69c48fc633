"""`keel status RUN_DIR` and `keel status JOB`: where a run stands.

    demo-ppo: running, step 12/40 (30%), ETA 1m24s
      reward   +0.212  (+0.048 over the last 10 steps)    kl 0.0131    length 3.2
      speed    21.4 samples/s, 3.0 s/step
      rollout  2 workers (1 replaced): rollout-0 v12, rollout-2 v12
      errors   rollout lost 1, reward unavailable 3
      eval     after step 10: reward +0.230  task 0.410
      checkpoint step-000010 (2m ago)
      error    learner rank 1: lost during update at step 7 (...)   <- the last error, when the run died

A run directory's status is read from its files alone (the run may be running, stopped, finished
or dead; nothing needs to be up): config.yaml (the total of steps), metrics.jsonl, checkpoints/ and
error.txt (written by `keel train` when it ends with an error, removed when it starts again). A
running job's comes from its controller, which reports the same summary of its metrics to the
job's control actor after every step (`summarize`).
"""

from __future__ import annotations

import time
from pathlib import Path

from keel.telemetry.plots import read_metrics

ERROR_FILE = "error.txt"


def record_error(run_dir: Path, message: str) -> None:
    """Leave the error a run ended with where `keel status` finds it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / ERROR_FILE).write_text(message.rstrip() + "\n")


def clear_error(run_dir: Path) -> None:
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)


def run_status(run_dir: Path, now: float | None = None) -> dict:
    """What `format_status` prints, as a dict. Raises FileNotFoundError when `run_dir` holds no run."""
    import yaml

    run_dir = Path(run_dir)
    config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config.is_file() and not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no keel train run here (no config.yaml or metrics.jsonl)")
    now = time.time() if now is None else now
    cfg = yaml.safe_load(config.read_text()) if config.is_file() else {}
    lines = read_metrics(metrics) if metrics.is_file() else []
    total = (cfg.get("controller") or {}).get("steps")
    error = run_dir / ERROR_FILE
    error_text = error.read_text().strip() if error.is_file() else None
    info = summarize(cfg.get("name", run_dir.name), total, lines, latest_checkpoint(run_dir, now), error_text)
    info["state"] = _state(info, metrics, now)
    return info


def summarize(name: str, total: int | None, lines: list[dict], checkpoint: dict | None, error: str | None) -> dict:
    """The status of a run from its metrics lines (all of them, or at least the last ten steps and the
    last evaluation), its latest checkpoint (`latest_checkpoint`) and the error it ended with; no
    `state`, which the caller knows."""
    steps = [m for m in lines if "reward_mean" in m]
    evals = [m for m in lines if any(k.startswith("eval/") for k in m)]
    done = steps[-1]["step"] + 1 if steps else 0
    info: dict = {"name": name, "done": done, "total": total}
    if steps:
        last, recent = steps[-1], steps[-10:]
        info |= {
            "reward": last["reward_mean"],
            "reward_change": last["reward_mean"] - recent[0]["reward_mean"] if len(recent) > 1 else None,
            "change_over": len(recent) - 1,
            "kl": last.get("kl"),
            "length": last.get("response_length"),
            "samples_per_s": _mean(recent, "samples_per_s"),
            "step_time": _mean(recent, "step_time"),
            "workers": last.get("rollout/workers"),
            "replaced": last.get("rollout/restarts"),
            "run_restarts": last.get("run/restarts"),
            "weight_versions": last.get("rollout/weight_versions"),
            "errors": {k.removeprefix("errors/"): v for k, v in last.items() if k.startswith("errors/")},
        }
        if total and info["step_time"]:
            info["eta_s"] = max(0, total - done) * info["step_time"]
    if evals:
        info["eval"] = evals[-1]
    info["checkpoint"] = checkpoint
    info["error"] = error
    return info


def _mean(lines: list[dict], key: str) -> float | None:
    values = [m[key] for m in lines if isinstance(m.get(key), int | float)]
    return sum(values) / len(values) if values else None


def latest_checkpoint(run_dir: Path, now: float | None = None) -> dict | None:
    """The run's latest checkpoint: name, step, finished and age (None: none yet)."""
    from keel.controller.checkpoint import STATE_FILE, CheckpointStore

    path = CheckpointStore(run_dir / "checkpoints", 1).latest()
    if path is None:
        return None
    state = CheckpointStore.read_state(path)
    age = (time.time() if now is None else now) - (path / STATE_FILE).stat().st_mtime
    return {"name": path.name, "step": state["step"], "finished": state["finished"], "age_s": age}


def _state(info: dict, metrics: Path, now: float) -> str:
    checkpoint = info["checkpoint"]
    if checkpoint and checkpoint["finished"]:
        return "finished"
    if info["error"]:
        return "failed"
    if metrics.is_file() and info.get("step_time") and now - metrics.stat().st_mtime < max(60.0, 5 * info["step_time"]):
        return "running"
    return "stopped (run the same keel train command to resume)" if checkpoint else "not running"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(info: dict) -> str:
    total = info["total"]
    progress = f"step {info['done']}/{total} ({100 * info['done'] / total:.0f}%)" if total else f"step {info['done']}"
    head = f"{info['name']}: {info['state']}, {progress}"
    if info["state"] == "running" and "eta_s" in info:
        head += f", ETA {_duration(info['eta_s'])}"
    out = [head]
    if "reward" in info:
        change = info["reward_change"]
        trend = f"  ({change:+.3f} over the last {info['change_over']} steps)" if change is not None else ""
        kl = f"    kl {info['kl']:.4f}" if info.get("kl") is not None else ""
        length = f"    length {info['length']:.1f}" if info.get("length") is not None else ""
        out.append(f"  reward   {info['reward']:+.3f}{trend}{kl}{length}")
        speed = []
        if info.get("samples_per_s"):
            speed.append(f"{info['samples_per_s']:.1f} samples/s, {info['step_time']:.1f} s/step")
        if info.get("run_restarts"):
            speed.append(f"run restarted {info['run_restarts']:.0f}x")
        if speed:
            out.append("  speed    " + "    ".join(speed))
        if info.get("workers") is not None:
            replaced = f" ({info['replaced']:.0f} replaced)" if info.get("replaced") else ""
            versions = info.get("weight_versions") or {}
            serving = ": " + ", ".join(f"{w} v{v}" for w, v in versions.items()) if versions else ""
            out.append(f"  rollout  {info['workers']:.0f} workers{replaced}{serving}")
        if info.get("errors"):
            counts = (f"{key.replace('/', ' ')} {n:.0f}" for key, n in info["errors"].items())
            out.append("  errors   " + ", ".join(counts))
    if "eval" in info:
        m = info["eval"]
        task = f"  task {m['eval/task_metric']:.3f}" if "eval/task_metric" in m else ""
        out.append(f"  eval     after step {m['step']}: reward {m['eval/reward_mean']:+.3f}{task}")
    checkpoint = info["checkpoint"]
    if checkpoint:
        final = ", final" if checkpoint["finished"] else ""
        out.append(f"  checkpoint {checkpoint['name']}{final} ({_duration(checkpoint['age_s'])} ago)")
    else:
        out.append("  checkpoint none yet")
    if info["error"]:
        out.append(f"  error    {info['error']}")
    return "\n".join(out)
