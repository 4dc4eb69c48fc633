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
    for command in (
        "config",
        "make-tiny-model",
        "make-task-data",
        "train",
        "sft",
        "rm",
        "dpo",
        "eval",
        "bon",
        "cai",
        "demo",
        "serve",
    ):
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


def test_make_task_data_kinds(tmp_path):
    out = run(
        "make-task-data",
        "arithmetic",
        str(tmp_path / "s.jsonl"),
        "--kind",
        "sft",
        "--rows",
        "50",
        "--wrong-share",
        "0.4",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    wrong = sum(r["response"] != r["answer"] for r in rows)
    assert 5 < wrong < 35 and {"prompt", "response", "answer"} <= set(rows[0])
    out = run("make-task-data", "arithmetic", str(tmp_path / "p.jsonl"), "--kind", "preferences", "--rows", "20")
    assert out.returncode == 0, out.stderr
    pair = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert pair["chosen"] != pair["rejected"] and pair["margin"] in (1.0, 2.0)
    assert run("make-task-data", "arithmetic", str(tmp_path / "x.jsonl"), "--wrong-share", "1.5").returncode == 2


def _yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_sft_rm_dpo_eval_commands_chain(demo_inputs, tmp_path):
    """Every offline command on tiny data, each reading the previous one's output, as a user runs them."""
    from keel.data.tasks import arithmetic_preference_rows, arithmetic_sft_rows, write_jsonl

    policy, prompts = demo_inputs
    sft_rows = write_jsonl(arithmetic_sft_rows(128, seed=1), tmp_path / "sft.jsonl")
    pairs = write_jsonl(arithmetic_preference_rows(128, seed=2), tmp_path / "pairs.jsonl")
    common = {"trainer": {"micro_batch_size": 32}, "train": {"epochs": 1, "batch_size": 32}}
    sft = _yaml(
        tmp_path / "sft.yaml",
        {"model": {"path": str(policy)}, "data": {"path": str(sft_rows), "eval_fraction": 0.25}, **common},
    )
    out = run("sft", "--config", sft, "--out", str(tmp_path / "sft"), "--log-every", "1")
    assert out.returncode == 0, out.stderr
    assert "sft step     1  loss " in out.stdout and "held out: loss " in out.stdout
    assert f"wrote sft model to {tmp_path / 'sft'}" in out.stdout
    pair_data = {"path": str(pairs), "eval_fraction": 0.25}
    rm = _yaml(tmp_path / "rm.yaml", {"model": {"path": str(tmp_path / "sft")}, "data": pair_data, **common})
    out = run("rm", "--config", rm, "--out", str(tmp_path / "rm"))
    assert out.returncode == 0, out.stderr
    assert "rm step     3  held out: loss" in out.stdout and "accuracy" in out.stdout  # 96 pairs: 3 steps
    dpo = _yaml(tmp_path / "dpo.yaml", {"model": {"path": str(tmp_path / "sft")}, "data": pair_data, **common})
    out = run("dpo", "--config", dpo, "--out", str(tmp_path / "dpo"))
    assert out.returncode == 0, out.stderr
    evaluation = _yaml(
        tmp_path / "eval.yaml",
        {
            "checkpoints": [
                {"name": "sft", "path": str(tmp_path / "sft")},
                {"name": "dpo", "path": str(tmp_path / "dpo")},
            ],
            "reference": str(tmp_path / "sft"),
            "data": {"prompts": str(prompts), "metadata_fields": ["answer"]},
            "sampling": {"max_new_tokens": 4},
            "judge": str(tmp_path / "rm"),
            "task_metric": "keel.reward.rules:arithmetic_exact",
            "max_prompts": 16,
        },
    )
    out = run("eval", "--config", evaluation, "--out", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert [c["name"] for c in result["checkpoints"]] == ["sft", "dpo"]
    assert result["checkpoints"][0]["win_rate"] == 0.5  # the reference against itself


def test_offline_commands_refuse_bad_input_before_training(tmp_path):
    cfg = _yaml(tmp_path / "sft.yaml", {"model": {"path": str(tmp_path / "nope")}, "data": {"path": "missing.jsonl"}})
    out = run("sft", "--config", cfg, "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"keel: config error: {cfg}: model.path: {tmp_path / 'nope'} does not exist",
        f"keel: config error: {cfg}: data.path: missing.jsonl does not exist",
    ]
    bad = _yaml(tmp_path / "rm.yaml", {"model": {"path": "m"}, "data": {"path": "d"}, "train": {"batch_size": 30}})
    out = run("rm", "--config", bad)
    assert out.returncode == 2
    assert (
        "train.batch_size: 30 must be a multiple of trainer.micro_batch_size x trainer.replicas (8 x 1)" in out.stderr
    )
    out = run("config", "validate", "--kind", "dpo", str(ROOT / "deploy" / "configs" / "dpo.yaml"))
    assert out.returncode == 0 and "dpo from runs/demo/sft" in out.stdout


def test_a_bad_row_is_a_data_error_naming_file_and_row(demo_inputs, tmp_path):
    policy, _ = demo_inputs
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    cfg = _yaml(tmp_path / "sft.yaml", {"model": {"path": str(policy)}, "data": {"path": str(data)}})
    out = run("sft", "--config", cfg, "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert f"keel: data error: {data}:2: missing field 'response'" in out.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_train_refuses_a_missing_held_out_file_or_metric_before_starting(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "x").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(
        BASE.replace("function: 'a:b'", "function: 'keel.reward.rules:arithmetic'").replace(
            "{prompts: x}", "{prompts: x, eval_prompts: gone.jsonl, eval_task_metric: 'no_mod:exact'}"
        )
    )
    out = run("train", "--config", str(path), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"keel: config error: {path}: data.eval_prompts: gone.jsonl does not exist"
    assert lines[1].startswith(f"keel: config error: {path}: data.eval_task_metric: cannot import module 'no_mod'")
    assert not (tmp_path / "run").exists()


def test_a_failed_train_leaves_its_error_for_keel_status(tmp_path, tiny_model_dir):
    import os

    from keel.data.tasks import arithmetic_rows, write_jsonl

    prompts = write_jsonl(arithmetic_rows(8), tmp_path / "prompts.jsonl")
    config = {
        "model": {"policy": str(tiny_model_dir)},
        "data": {"prompts": str(prompts), "metadata_fields": ["answer"]},
        "rollout": {"backend": "hf", "resources": {"num_cpus": 0.25, "custom": {"gpu_node": 1}}},
        "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
        "controller": {"steps": 2, "prompts_per_step": 4},
        "algorithm": {"mini_batch_size": 4},
        "learner": {"micro_batch_size": 4, "resources": {"num_cpus": 0.5}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray of its own
    out = subprocess.run(
        [KEEL, "train", "--config", str(path), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 1 and "cannot place role 'rollout'" in out.stderr
    status = run("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].endswith("failed, step 0/2 (0%)")
    assert "error    cannot place role 'rollout'" in status.stdout


@pytest.mark.parametrize("kind", ["train", "sft"])
def test_a_tracker_that_is_not_installed_stops_the_command_before_anything_starts(kind, tmp_path):
    """The tracker's package made unimportable (as when it is not installed): exit 2, one line naming
    logging.trackers and the pip package, and no run directory."""
    (tmp_path / "p").mkdir()
    (tmp_path / "x").write_text("")
    logging = {"trackers": ["tensorboard", "wandb"]}
    if kind == "train":
        cfg = {"model": {"policy": "p"}, "data": {"prompts": "x"}, "logging": logging}
        cfg["reward"] = {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}}
    else:
        cfg = {"model": {"path": "p"}, "data": {"path": "x"}, "logging": logging}
    path = _yaml(tmp_path / f"{kind}.yaml", cfg)
    where = "--run-dir" if kind == "train" else "--out"
    script = "import sys; sys.modules['wandb'] = None; from keel.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [kind, "--config", path, where, str(tmp_path / "run")]
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"keel: config error: {path}: logging.trackers: wandb needs the Python package wandb, which is not "
        "installed (pip install wandb)"
    ]
    assert not (tmp_path / "run").exists()


def test_bon_refuses_a_bad_field_or_a_missing_file_before_anything_starts(tmp_path):
    """Exit 2 with one line per problem naming the field, and no Ray, no dataset, no run directory."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "prompts.jsonl").write_text("")
    cfg = {
        "model": {"policy": str(tmp_path / "policy")},
        "data": {"prompts": str(tmp_path / "prompts.jsonl")},
        "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
        "bon": {"n": 8, "keep": "threshold"},
    }
    path = _yaml(tmp_path / "bon.yaml", cfg)
    out = run("bon", "--config", path, "--out", str(tmp_path / "bon.jsonl"), cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"keel: config error: {path}: bon.threshold: required with bon.keep threshold: the score a response needs"
    ]
    cfg["bon"] = {"n": 8, "keep": "threshold", "threshold": 0.5}
    cfg["model"]["policy"] = str(tmp_path / "nope")
    cfg["reward"]["source"]["function"] = "no_mod:f"
    path = _yaml(tmp_path / "bon.yaml", cfg)
    out = run("bon", "--config", path, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert lines[0] == f"keel: config error: {path}: model.policy: {tmp_path / 'nope'} does not exist"
    assert "reward.source.function: cannot import module 'no_mod'" in lines[1] and len(lines) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bon.yaml", "policy", "prompts.jsonl"]
    out = run("config", "validate", "--kind", "bon", "deploy/configs/bon.yaml")
    assert out.returncode == 0 and "best of 8 from runs/demo/sft, keep best" in out.stdout


def test_bon_writes_a_dataset_keel_sft_reads(demo_inputs, tmp_path):
    """keel bon on a local Ray of its own (a smoke run: 4 prompts x 2 samples), then keel sft on its output."""
    import os

    policy, prompts = demo_inputs
    bon = {
        "model": {"policy": str(policy), "max_prompt_tokens": 16},
        "data": {"prompts": str(prompts), "metadata_fields": ["answer"]},
        "rollout": {"backend": "hf", "resources": {"num_cpus": 0.25}, "sampling": {"max_new_tokens": 4}},
        "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
        "bon": {"n": 2, "keep": "threshold", "threshold": 0.0, "max_prompts": 4},
    }
    path = _yaml(tmp_path / "bon.yaml", bon)
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray of its own
    out = subprocess.run(
        [KEEL, "bon", "--config", path, "--out", str(tmp_path / "bon.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 prompts x 2 samples = 8 scored" in out.stdout and f"wrote {tmp_path / 'bon.jsonl'}" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "bon.jsonl").read_text().splitlines()]
    assert 0 < len(rows) <= 8 and {r["prompt_id"] for r in rows} <= {"0", "1", "2", "3"}
    sft = {
        "model": {"path": str(policy)},
        "data": {"path": str(tmp_path / "bon.jsonl"), "max_tokens": 16},
        "trainer": {"micro_batch_size": 1},
        "train": {"batch_size": 1, "max_steps": 1},
        "logging": {"trackers": []},
    }
    out = run("sft", "--config", _yaml(tmp_path / "sft.yaml", sft), "--out", str(tmp_path / "sft"))
    assert out.returncode == 0, out.stderr
    assert f"wrote sft model to {tmp_path / 'sft'}" in out.stdout


def test_sft_and_dpo_commands_train_lora_adapters(demo_inputs, tmp_path):
    """keel sft, then keel dpo on its merged model, each with model.lora: both write the adapter and
    the merged model; a LoRA config keel does not support stops before anything starts."""
    from keel.data.tasks import arithmetic_preference_rows, arithmetic_sft_rows, write_jsonl

    policy, _ = demo_inputs
    sft_rows = write_jsonl(arithmetic_sft_rows(64, seed=1), tmp_path / "sft.jsonl")
    pairs = write_jsonl(arithmetic_preference_rows(64, seed=2), tmp_path / "pairs.jsonl")
    common = {"trainer": {"micro_batch_size": 32}, "train": {"epochs": 1, "batch_size": 32}}
    lora = {"rank": 4, "alpha": 8}
    sft = _yaml(
        tmp_path / "sft.yaml", {"model": {"path": str(policy), "lora": lora}, "data": {"path": str(sft_rows)}, **common}
    )
    out = run("sft", "--config", sft, "--out", str(tmp_path / "sft"))
    assert out.returncode == 0, out.stderr
    assert (
        f"wrote sft LoRA adapter to {tmp_path / 'sft'} and the merged model to {tmp_path / 'sft' / 'merged'}"
        in out.stdout
    )
    model = {"path": str(tmp_path / "sft" / "merged"), "lora": lora}
    dpo = _yaml(tmp_path / "dpo.yaml", {"model": model, "data": {"path": str(pairs)}, **common})
    out = run("dpo", "--config", dpo, "--out", str(tmp_path / "dpo"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "dpo" / "adapter_model.safetensors").exists() and (tmp_path / "dpo" / "merged").is_dir()
    bad = _yaml(
        tmp_path / "bad.yaml", {"model": model, "data": {"path": str(pairs)}, "reference": str(policy), **common}
    )
    out = run("dpo", "--config", bad, "--out", str(tmp_path / "bad"))
    assert out.returncode == 2 and "reference: with model.lora the reference is model.path" in out.stderr
