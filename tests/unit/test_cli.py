"""Smoke runs of every `keel` entry point through the installed console script."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEEL = shutil.which("keel", path=str(Path(sys.executable).parent)) or "keel"


BASE = "model: {policy: p}\ndata: {prompts: x}\nreward: {source: {type: function, function: 'a:b'}}\n"


def run(*args, cwd=ROOT):
    return subprocess.run([KEEL, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("config", "make-tiny-model", "make-task-data", "train"):
        assert command in out.stdout


def test_bare_keel_is_usage_error():
    assert run().returncode == 2
    assert run("config").returncode == 2


def test_config_validate_ok():
    out = run("config", "validate", "deploy/configs/demo.yaml")
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: {policy: p\n", "malformed YAML: line 2"),
        (
            BASE.replace("policy: p", "policy: p, extra: 1"),
            "model.extra: unknown key",
        ),
        (
            BASE + "rollout: {replicas: 0}\n",
            "rollout.replicas: Input should be greater than or equal to 1",
        ),
        (
            BASE + "learner: {optimizer: {lr: -1e-5}}\n",
            "learner.optimizer.lr: Input should be greater than 0",
        ),
        (
            BASE + "rollout: {sampling: {n: many}}\n",
            "rollout.sampling.n: Input should be a valid integer",
        ),
    ],
)
def test_config_validate_bad_input_exit_2_one_line(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    out = run("config", "validate", str(path))
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"keel: config error: {path}: {expected}"), lines[0]


def test_config_schema_is_json_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with the dev extra")
    out = run("config", "schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "rollout" in schema["properties"]


def test_make_tiny_model_cli(tmp_path):
    out = run("make-tiny-model", str(tmp_path / "m"), "--layers", "1")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 1


def test_make_tiny_model_rejects_small_head_dim(tmp_path):
    out = run("make-tiny-model", str(tmp_path / "m"), "--heads", "8")
    assert out.returncode == 2
    assert "head_dim 16 < 32" in out.stderr
    assert not (tmp_path / "m").exists()


def test_train_refuses_missing_files_before_starting_anything(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        BASE.replace("policy: p", f"policy: {tmp_path}/nope").replace("function: 'a:b'", "function: 'no_mod:f'")
    )
    out = run("train", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"keel: config error: {path}: model.policy: {tmp_path}/nope does not exist"
    assert lines[1] == f"keel: config error: {path}: data.prompts: x does not exist"
    assert "reward.source.function: cannot import module 'no_mod'" in lines[2]
    assert not (tmp_path / "run").exists()


def test_make_task_data(tmp_path):
    out = run("make-task-data", "arithmetic", str(tmp_path / "p.jsonl"), "--rows", "7")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 7
    for row in rows:
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(a) + int(b) == int(row["answer"])


def test_train_over_grpc_without_a_token_is_refused_before_starting(tmp_path):
    import os

    (tmp_path / "p").mkdir()
    (tmp_path / "x").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(
        BASE.replace("function: 'a:b'", "function: 'keel.reward.rules:arithmetic'")
        + "transport: {weights: grpc, grpc: {tls_ca: missing-ca.pem}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KEEL_GRPC_TOKEN"}
    out = subprocess.run(
        [KEEL, "train", "--config", str(path), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [
        f"keel: config error: {path}: transport.grpc.auth is on but no token was found in $KEEL_GRPC_TOKEN "
        "(set auth: false to run without one)",
        f"keel: config error: {path}: transport.grpc.tls_ca: missing-ca.pem does not exist",
    ]
    assert not (tmp_path / "run").exists()
