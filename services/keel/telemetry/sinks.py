"""Where a run's metrics go: metrics.jsonl always, and the trackers `logging.trackers` names.

Every command that trains logs through `open_sinks` (`keel train` in `Controller._record`, `keel sft`,
`keel rm`, `keel dpo` on rank 0 in `OfflineTrainer.fit`): one `MetricSinks` that hands each metrics
line to every sink.

  metrics.jsonl   JsonlSink: one JSON line per call, everything kept, NaN written as null, flushed
  tensorboard     TensorBoardSink: a scalar per numeric metric, under its name, in RUN_DIR/tensorboard
  wandb           WandbSink: a W&B run (offline by default: RUN_DIR/wandb, no network)
  mlflow          MlflowSink: an MLflow run (default: a file store in RUN_DIR/mlruns)

Trackers get only numbers (a string, None or a list stays in metrics.jsonl alone), at the step the
line carries. After a resume metrics.jsonl is cut back to the checkpoint (`cut_metrics`), and the
steps after it are written again: TensorBoard keeps both values (a new event file in the same
directory), MLflow takes a second value for the step in the same run, and W&B gets a new run (it
refuses steps below its last one).

The tracker packages are imported only when a sink opens; `tracker_problems` says, before anything
starts, which of them are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from keel.config import MlflowConfig, OutputConfig, WandbConfig

# tracker -> (module it imports, pip package that provides it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}


class MetricSink(Protocol):
    def write(self, metrics: dict, step: int) -> None:
        """One metrics line of step `step`."""

    def close(self) -> None:
        """Flush and release; nothing is written after."""


class TrackerMissing(RuntimeError):
    """A tracker in logging.trackers whose Python package is not installed."""


def tracker_problems(trackers: list[str]) -> list[str]:
    """One `logging.trackers: ...` line per tracker whose package is not installed (nothing is imported)."""
    problems = []
    for tracker in trackers:
        module, package = TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(module) is None:
            problems.append(
                f"logging.trackers: {tracker} needs the Python package {package}, which is not installed "
                f"(pip install {package})"
            )
    return problems


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric values of a metrics line, as floats, without `step` (the trackers' x axis)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class JsonlSink:
    """metrics.jsonl: one line per call, appended and flushed; NaN is written as null."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def write(self, metrics: dict, step: int) -> None:
        line = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """TensorBoard event files in `log_dir` (one new file per process; TensorBoard reads them together)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def write(self, metrics: dict, step: int) -> None:
        for name, value in scalars(metrics).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a step takes seconds: readers see it at once

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run named `run_name`, written under run_dir/wandb."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, project: str, run_name: str, config: dict | None):
        import wandb

        self.run = wandb.init(
            project=cfg.project or project,
            entity=cfg.entity,
            name=run_name,
            dir=str(run_dir),  # W&B adds the wandb/ folder itself
            mode=cfg.mode,
            config=config,
            reinit="create_new",  # one W&B run per sink, beside any other in the process
            # console off: W&B must not wrap stdout (the console's progress display owns it)
            settings=wandb.Settings(silent=True, console="off", disable_git=True),
        )

    def write(self, metrics: dict, step: int) -> None:
        values = scalars(metrics)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before W&B's service process has written the run file (seen with the first run
        # of a process); shutting the service down waits for it. W&B starts it again for a next run.
        wandb.teardown()


_MLFLOW_NAME = re.compile(r"[^\w./ -]")  # characters MLflow refuses in a metric or parameter name


class MlflowSink:
    """An MLflow run named `run_name` in the experiment; a resumed run continues the MLflow run that
    logged this run directory before (found by its tag), when there is one."""

    RUN_DIR_TAG = "keel.run_dir"

    def __init__(
        self, cfg: MlflowConfig, run_dir: Path, experiment: str, run_name: str, config: dict | None, resumed: bool
    ):
        uri = cfg.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a file store is what
            # Keel writes by default, so it opts in (a user's explicit MLFLOW_ALLOW_FILE_STORE stays)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = cfg.experiment or experiment
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        here = str(run_dir.resolve())
        where = f"tags.`{self.RUN_DIR_TAG}` = '{here}'"
        earlier = []
        if resumed and "'" not in here:
            earlier = self.client.search_runs([experiment_id], filter_string=where, max_results=1)
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_name, tags={self.RUN_DIR_TAG: here})
            self.run_id = run.info.run_id
            self._log_params(config or {})

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(_MLFLOW_NAME.sub("_", k), str(v)[:6000]) for k, v in _flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def write(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_NAME.sub("_", k), v, now, step) for k, v in scalars(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


class MetricSinks:
    """Every sink of a run as one: `write` hands a metrics line to each, `close` closes each (once)."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks
        self.closed = False

    def write(self, metrics: dict, step: int) -> None:
        for sink in self.sinks:
            sink.write(metrics, step)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def open_sinks(
    cfg: OutputConfig, run_dir: Path, name: str, config: dict | None = None, resumed: bool = False
) -> MetricSinks:
    """metrics.jsonl in `run_dir` (appended to) and the trackers `cfg.trackers` names. `name` (the
    config's) is the default W&B project and MLflow experiment, the run directory's name the tracker
    run's, and `config` (a config dump) goes to the trackers as the run's config; `resumed`: the run
    continues from a checkpoint (MLflow then continues its run). Raises TrackerMissing, naming
    logging.trackers and the package, when a tracker's package is not installed."""
    problems = tracker_problems(cfg.trackers)
    if problems:
        raise TrackerMissing("; ".join(problems))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    try:
        for tracker in cfg.trackers:
            if tracker == "tensorboard":
                sinks.append(TensorBoardSink(run_dir / "tensorboard"))
            elif tracker == "wandb":
                sinks.append(WandbSink(cfg.wandb, run_dir, name, run_dir.resolve().name, config))
            else:
                sinks.append(MlflowSink(cfg.mlflow, run_dir, name, run_dir.resolve().name, config, resumed))
    except BaseException:
        MetricSinks(sinks).close()
        raise
    return MetricSinks(sinks)
