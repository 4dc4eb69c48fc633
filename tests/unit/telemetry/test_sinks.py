"""The metric sinks on real trackers: a few steps go in through `open_sinks`, and come back out through
each tracker's own reader (TensorBoard's EventAccumulator, MLflow's client, W&B's run file)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from keel.config import OutputConfig
from keel.telemetry.sinks import JsonlSink, TrackerMissing, open_sinks, tracker_problems
from unit.telemetry.trackers import tensorboard_scalars, wandb_history, wandb_run

STEPS = [
    {"step": 0, "reward_mean": 0.25, "time/rollout": 1.5, "rollout/workers": 2, "note": "warm-up"},
    {"step": 1, "reward_mean": 0.5, "time/rollout": 1.25, "rollout/workers": 2, "value/loss": float("nan")},
    {"step": 2, "reward_mean": 0.75, "time/rollout": 1.0, "rollout/workers": 2, "flags": [1, 2], "done": None},
]
CONFIG = {"name": "demo", "algorithm": {"estimator": "gae", "kl": {"coef": 0.05}}}


def _write(cfg: OutputConfig, run_dir, steps=STEPS, resumed=False):
    with open_sinks(cfg, run_dir, "demo", CONFIG, resumed) as sinks:
        for m in steps:
            sinks.write(m, m["step"])


def test_metrics_jsonl_keeps_everything_nan_as_null_one_flushed_line_per_write(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.write(STEPS[0], 0)
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(STEPS[0]) + "\n"  # on disk before close
    sink.write(STEPS[1], 1)
    sink.close()
    second = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert second["value/loss"] is None and second["reward_mean"] == 0.5


def test_tensorboard_by_default_holds_each_numeric_metric_at_its_step(tmp_path):
    cfg = OutputConfig()
    assert cfg.trackers == ["tensorboard"]
    _write(cfg, tmp_path)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    # numbers only: the note, the list and None stay in metrics.jsonl; step is the x axis
    assert set(scalars) == {"reward_mean", "time/rollout", "rollout/workers", "value/loss"}
    assert scalars["reward_mean"] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert scalars["rollout/workers"] == [(0, 2.0), (1, 2.0), (2, 2.0)]
    assert math.isnan(scalars["value/loss"][0][1])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["note"] == "warm-up" and lines[2]["flags"] == [1, 2]  # jsonl always, and keeps all


def test_a_resumed_run_appends_to_tensorboard_and_continues_the_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = OutputConfig(trackers=["tensorboard", "mlflow"])
    _write(cfg, tmp_path)
    # resumed from the checkpoint of step 1: steps 1 and 2 are written again
    _write(cfg, tmp_path, [{**m, "reward_mean": m["reward_mean"] + 1} for m in STEPS[1:]], resumed=True)
    assert tensorboard_scalars(tmp_path / "tensorboard")["reward_mean"] == [
        (0, 0.25), (1, 0.5), (2, 0.75), (1, 1.5), (2, 1.75)
    ]  # fmt: skip
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "reward_mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.5), (1, 1.5), (2, 0.75), (2, 1.75)]
    _write(cfg, tmp_path, STEPS[:1])  # a fresh start in the same directory (no checkpoint yet): a new MLflow run
    assert len(client.search_runs([runs[0].info.experiment_id])) == 2


def test_mlflow_file_store_in_the_run_dir_named_after_run_and_config(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "demo-20260101-000000"
    _write(OutputConfig(trackers=["mlflow"]), run_dir)
    assert not (run_dir / "tensorboard").exists()  # only what trackers lists
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("demo")  # the config's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "demo-20260101-000000"  # the run directory's
    metrics = run.data.metrics  # each metric's latest value
    assert set(metrics) == {"reward_mean", "time/rollout", "rollout/workers", "value/loss"}
    assert (metrics["reward_mean"], metrics["rollout/workers"]) == (0.75, 2.0) and math.isnan(metrics["value/loss"])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "time/rollout")] == [
        (0, 1.5), (1, 1.25), (2, 1.0)
    ]  # fmt: skip
    assert run.data.params["algorithm.kl.coef"] == "0.05" and run.data.params["name"] == "demo"


def test_mlflow_tracking_uri_and_experiment_from_the_config(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "shared-mlruns"
    cfg = OutputConfig(trackers=["mlflow"], mlflow={"tracking_uri": str(store), "experiment": "keel-sweeps"})
    _write(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "mlruns").exists()
    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("keel-sweeps").experiment_id])
    assert run.data.metrics["reward_mean"] == 0.75


def test_wandb_offline_run_dir_holds_the_history_and_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "demo-run"
    _write(OutputConfig(trackers=["wandb"], wandb={"entity": "keel-team"}), run_dir)
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # mode offline by default: no network
    history = wandb_history(run_file)
    assert [step for step, _ in history] == [0, 1, 2]
    assert [row["reward_mean"] for _, row in history] == [0.25, 0.5, 0.75]
    assert history[2][1] == {"reward_mean": 0.75, "time/rollout": 1.0, "rollout/workers": 2}
    run = wandb_run(run_file)
    assert (run.project, run.entity, run.display_name) == ("demo", "keel-team", "demo-run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algorithm"] == CONFIG["algorithm"]


def test_wandb_project_from_the_config(tmp_path):
    _write(OutputConfig(trackers=["wandb"], wandb={"project": "rlhf-sweeps"}), tmp_path)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_run(run_file).project == "rlhf-sweeps"


def test_wandb_online_goes_to_the_server_and_needs_a_login(tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = OutputConfig(trackers=["wandb"], wandb={"mode": "online"})
    with pytest.raises(wandb.errors.UsageError, match="API key"):
        open_sinks(cfg, tmp_path / "run", "demo")
    assert not list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_a_tracker_that_is_not_installed_is_named_with_its_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails, as without the package
    monkeypatch.setitem(sys.modules, "mlflow", None)
    expected = [
        "logging.trackers: wandb needs the Python package wandb, which is not installed (pip install wandb)",
        "logging.trackers: mlflow needs the Python package mlflow-skinny, which is not installed "
        "(pip install mlflow-skinny)",
    ]
    assert tracker_problems(["tensorboard", "wandb", "mlflow"]) == expected
    with pytest.raises(TrackerMissing, match=r"logging.trackers: wandb needs .* \(pip install wandb\)"):
        open_sinks(OutputConfig(trackers=["wandb"]), tmp_path / "run", "demo")
    assert not (tmp_path / "run").exists()  # nothing was made
