"""Checkpoints on disk: written atomically, found again after any crash, pruned only when safe.

Layout under a run's checkpoint directory:

    checkpoints/
      step-000012/          a complete checkpoint (whatever the run saves: see `Controller.save`)
        ...
        state.json          written last, inside the staging directory: its presence marks a
                            complete checkpoint even where a rename was not atomic
      step-000016/
      latest                the name of the newest complete checkpoint, replaced atomically
      .staging-step-000020-<id>/   a save in progress (or one a crash interrupted: ignored, removed)

A save goes to a staging directory, every file is flushed to disk, the directory is renamed to
its final name, and only then is `latest` replaced (written to a temporary file, flushed,
renamed). Older checkpoints are pruned after that. A kill -9 at any moment leaves the previous
checkpoint loadable: `latest` still names it, or names the new one only once it is complete.
Nothing in a checkpoint names the node or the absolute path it was written at, so a run
directory on shared storage (NFS, a Kubernetes PVC) can be resumed from any node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

STATE_FILE = "state.json"
LATEST = "latest"
_NAME = re.compile(r"^step-(\d+)$")
_STAGING = ".staging-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; names the path."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (and the directories themselves) to disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class CheckpointStore:
    """The checkpoints of one run directory (`root` is its checkpoints/ folder)."""

    def __init__(self, root: Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = keep_last

    # ------------------------------------------------------------------ writing

    def stage(self, step: int) -> Path:
        """A fresh staging directory for the checkpoint of `step`; fill it, then `commit` it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{_STAGING}{checkpoint_name(step)}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def commit(self, staged: Path, step: int, state: dict) -> Path:
        """Write `state` into the staged checkpoint, flush it, move it into place, point `latest` at
        it, then prune. Returns the checkpoint's path."""
        (staged / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
        fsync_tree(staged)
        final = self.root / checkpoint_name(step)
        if final.exists():  # the same step saved again (a resumed run that stopped at once): replace it
            aside = self.root / f"{_STAGING}replaced-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            os.rename(staged, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(staged, final)
        fsync_dir(self.root)
        write_atomic(self.root / LATEST, final.name + "\n")
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints (and the one `latest` names); remove
        the rest and every staging directory a crash left behind."""
        keep = self.complete()[-self.keep_last :]
        latest = self.latest()
        for path in self.complete():
            if path not in keep and path != latest:
                shutil.rmtree(path, ignore_errors=True)
        for stray in self.root.glob(f"{_STAGING}*"):
            shutil.rmtree(stray, ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a directory without its state file is a crash's leftover)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir() and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the one `latest` names when it is complete, else the newest
        complete one (a crash between the rename and the pointer update), else None."""
        pointer = self.root / LATEST
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if _NAME.match(path.name) and (path / STATE_FILE).is_file():
                return path
        complete = self.complete()
        return complete[-1] if complete else None

    @staticmethod
    def read_state(path: Path) -> dict:
        try:
            return json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path / STATE_FILE}: cannot read the checkpoint state ({err})") from None


def cut_metrics(path: Path, keep) -> int:
    """Rewrite metrics.jsonl with only the lines `keep(line_dict)` accepts, dropping a torn last line
    (a crash mid-write); atomic. Returns how many lines were dropped. A resumed run calls it so that
    no step appears twice."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for raw in path.read_text().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            dropped += 1
            continue
        if keep(line):
            kept.append(raw)
        else:
            dropped += 1
    write_atomic(path, "".join(f"{raw}\n" for raw in kept))
    return dropped


# Fields a resumed run may change: where and how it reports and saves, not what it computes.
MAY_DIFFER = (
    "logging.console",
    "logging.level",
    "logging.log_every",
    "logging.metrics_port",
    "logging.metrics_host",
    "logging.run_dir",
    "logging.trackers",
    "logging.wandb",
    "logging.mlflow",
    "output_dir",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "checkpoint.save_hf",
    "checkpoint.resume",
    "checkpoint.stop_grace_s",
    # deadlines and restart budgets: how long to wait for a role, not what it computes
    "controller.weight_sync_timeout_s",
    "controller.rollout_timeout_s",
    "controller.placement_timeout_s",
    "controller.start_timeout_s",
    "controller.score_timeout_s",
    "controller.update_timeout_s",
    "controller.control_timeout_s",
    "controller.max_restarts",
    "reward.outage_budget_s",
    "learner.deepspeed.timeout_s",
)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the fields where two config dumps (`model_dump(mode="json")`) differ,
    except MAY_DIFFER; `path: saved -> current` each. A section one dump lacks (made before the
    section existed) is compared field by field, as empty."""
    out = []
    for key in sorted(set(saved) | set(current)):
        path = f"{prefix}{key}"
        if path in MAY_DIFFER:
            continue
        a, b = saved.get(key), current.get(key)
        one_lacks_it = key not in saved or key not in current
        if (isinstance(a, dict) and isinstance(b, dict)) or (one_lacks_it and isinstance(a or b, dict)):
            out.extend(config_differences(a or {}, b or {}, f"{path}."))
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------- a keel train run


class RunCheckpoints:
    """What a `keel train` run saves and restores; the controller calls `save` and `restore`.

    A checkpoint of step k (k steps done, weight version k) holds:
      learner/              every learner rank's DeepSpeed state of the policy and critic
                            (ZeRO shards, optimizer, LR schedule), its update counters and RNG states
      hf/                   the policy in HF format (checkpoint.save_hf)
      inflight.pt           async mode: the batch generated ahead of step k+1, so it is not lost
      state.json            the controller's state (below) and the config the run was made with

    The rollout workers hold no state of their own: their weights are the learner's (published
    again on restore) and their samples are a pure function of the launch seed, which follows
    from the saved launch count. The reference and reward roles are stateless.
    """

    def __init__(self, run_dir: Path, keep_last: int, save_hf: bool):
        self.store = CheckpointStore(Path(run_dir) / "checkpoints", keep_last)
        self.save_hf = save_hf

    def save(self, ctrl, finished: bool = False) -> Path:
        import torch

        staged = self.store.stage(ctrl.version)
        on_learners = ctrl.supervisor.on_learners
        on_learners("save_checkpoint", str(staged / "learner"), what="checkpoint save", step=ctrl.version)
        if self.save_hf:
            on_learners("save_hf", str(staged / "hf"), what="HF export", step=ctrl.version)
        ahead = ctrl.park_inflight()  # async: the batch generated for the next step, collected now
        if ahead is not None:
            torch.save(ahead, staged / "inflight.pt")
        state = {
            "step": ctrl.version,
            "finished": finished,
            "kl_coef": ctrl.kl_coef,
            "sampler": ctrl.sampler.state(),
            "launches": ctrl.launches,
            "stale_dropped": ctrl.stale_dropped,
            "rollout_replicas": len(ctrl.rollout),
            "autoscaler": None
            if ctrl.autoscaler is None
            else {"over": ctrl.autoscaler.over, "under": ctrl.autoscaler.under},
            "config": ctrl.cfg.model_dump(mode="json"),
        }
        return self.store.commit(staged, ctrl.version, state)

    def restore(self, ctrl, path: Path) -> dict:
        """Bring a started controller (every actor up, weights at the initial policy) to the
        checkpoint at `path`; returns its state."""
        import torch

        state = self.store.read_state(path)
        load = ctrl.supervisor.on_learners
        versions = load("load_checkpoint", str(path / "learner"), what="checkpoint load", step=state["step"])
        if set(versions) != {state["step"]}:
            raise CheckpointError(f"{path}: learner ranks restored versions {versions}, expected {state['step']}")
        ctrl.version = state["step"]
        ctrl.kl_coef = state["kl_coef"]
        ctrl.sampler.load_state(state["sampler"])
        ctrl.launches = state["launches"]
        ctrl.stale_dropped = state["stale_dropped"]
        if ctrl.autoscaler is not None and state["autoscaler"] is not None:
            ctrl.autoscaler.over, ctrl.autoscaler.under = state["autoscaler"]["over"], state["autoscaler"]["under"]
        ahead = path / "inflight.pt"
        ctrl.restore_rollout(
            state["rollout_replicas"], torch.load(ahead, weights_only=False) if ahead.exists() else None
        )
        return state


class ResumeRefused(ValueError):
    """The run directory holds a run made with another config; `lines` names each differing field."""

    def __init__(self, run_dir: Path, lines: list[str]):
        self.lines = lines
        super().__init__(f"{run_dir} holds a run made with another config: " + "; ".join(lines))


def set_aside(run_dir: Path) -> Path | None:
    """Move a previous run's files (checkpoints/, metrics.jsonl, its config snapshot, the trackers'
    files: keel.telemetry.sinks) into `run_dir/replaced-<time>/`, never deleting them; returns where,
    or None when there was nothing."""
    import time

    names = ("checkpoints", "metrics.jsonl", "config.yaml", "keel_config.yaml")  # train's snapshot, the trainers'
    names += ("tensorboard", "mlruns", "wandb")  # a new run starts its own event files and tracker runs
    old = [run_dir / n for n in names if (run_dir / n).exists()]
    if not old:
        return None
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    aside.mkdir()
    for path in old:
        os.rename(path, aside / path.name)
    return aside


def resume_point(
    run_dir: Path, config_dump: dict, resume: bool, force_new: bool
) -> tuple[Path | None, dict | None, Path | None]:
    """What a run starting in `run_dir` continues from: (checkpoint, its state, None), or
    (None, None, where a previous run was set aside) for a fresh start. A previous run there that is
    not resumed (force_new, resume off, or no complete checkpoint) is set aside first, never deleted.
    Raises ResumeRefused when the checkpoint's config differs."""
    latest = CheckpointStore(Path(run_dir) / "checkpoints", 1).latest()
    if latest is not None and resume and not force_new:
        state = CheckpointStore.read_state(latest)
        differences = config_differences(state["config"], config_dump)
        if differences:
            raise ResumeRefused(run_dir, differences)
        return latest, state, None
    return None, None, set_aside(Path(run_dir))
