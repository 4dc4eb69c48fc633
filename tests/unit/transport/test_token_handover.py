"""The bearer token never travels in a Ray runtime_env or in a job's info: a driver hands its
actors the path of a private file, actors read their own environment or a token file, and
`keel submit` refuses a runtime env that holds the token."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from keel.config import GrpcConfig, parse_config
from keel.transport.security import SecurityConfigError, hand_over_token, load_token

TOKEN = "t0ken-that-must-not-leak"


def _run_config(**transport):
    return parse_config(
        {
            "model": {"policy": "p"},
            "data": {"prompts": "prompts.jsonl"},
            "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
            "transport": transport,
        }
    )


def test_hand_over_token_passes_a_private_file_path_never_the_token(monkeypatch):
    monkeypatch.setenv("KEEL_GRPC_TOKEN", TOKEN)
    env = hand_over_token(GrpcConfig())
    assert list(env) == ["KEEL_GRPC_TOKEN_FILE"] and TOKEN not in json.dumps(env)
    path = Path(env["KEEL_GRPC_TOKEN_FILE"])
    assert path.read_text() == TOKEN
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # a process that did not inherit the token finds it through the path alone
    monkeypatch.delenv("KEEL_GRPC_TOKEN")
    monkeypatch.setenv("KEEL_GRPC_TOKEN_FILE", str(path))
    assert load_token(GrpcConfig()) == TOKEN


def test_nothing_is_handed_over_without_an_env_token_or_with_auth_off(monkeypatch, tmp_path):
    monkeypatch.delenv("KEEL_GRPC_TOKEN", raising=False)
    (tmp_path / "tok").write_text(TOKEN)
    assert hand_over_token(GrpcConfig(token_file=str(tmp_path / "tok"))) == {}  # each process reads the file
    monkeypatch.setenv("KEEL_GRPC_TOKEN", TOKEN)
    assert hand_over_token(GrpcConfig(auth=False)) == {}


def test_the_processs_own_env_comes_first_then_the_handed_file_then_token_file(monkeypatch, tmp_path):
    (tmp_path / "handed").write_text("from-driver")
    (tmp_path / "mounted").write_text("from-mount")
    cfg = GrpcConfig(token_file=str(tmp_path / "mounted"))
    monkeypatch.setenv("KEEL_GRPC_TOKEN", "from-env")
    monkeypatch.setenv("KEEL_GRPC_TOKEN_FILE", str(tmp_path / "handed"))
    assert load_token(cfg) == "from-env"
    monkeypatch.delenv("KEEL_GRPC_TOKEN")
    assert load_token(cfg) == "from-driver"
    monkeypatch.setenv("KEEL_GRPC_TOKEN_FILE", str(tmp_path / "on-the-driver-node-only"))
    assert load_token(cfg) == "from-mount"


def test_a_handed_file_from_another_node_says_where_the_token_must_be(monkeypatch, tmp_path):
    monkeypatch.delenv("KEEL_GRPC_TOKEN", raising=False)
    elsewhere = tmp_path / "keel-token-x" / "token"
    monkeypatch.setenv("KEEL_GRPC_TOKEN_FILE", str(elsewhere))
    with pytest.raises(SecurityConfigError) as info:
        load_token(GrpcConfig())
    assert str(info.value) == (
        "transport.grpc.auth is on but no token was found in $KEEL_GRPC_TOKEN (set auth: false to run without one)"
        f"; the driver's token file {elsewhere} is not on this node: set $KEEL_GRPC_TOKEN in the environment of "
        "`ray start` on every node, or mount transport.grpc.token_file there"
    )


def test_grpc_token_env_of_a_run_holds_no_token(monkeypatch):
    from keel.controller.channels import grpc_token_env

    monkeypatch.setenv("KEEL_GRPC_TOKEN", TOKEN)
    env = grpc_token_env(_run_config(weights="grpc"))
    assert set(env) == {"KEEL_GRPC_TOKEN_FILE"} and TOKEN not in json.dumps(env)
    assert grpc_token_env(_run_config()) == {}  # no gRPC channel
    assert grpc_token_env(_run_config(weights="grpc", grpc={"auth": False})) == {}


@pytest.mark.slow
def test_a_ray_worker_started_without_the_token_gets_it_and_ray_never_holds_it(ray_session, monkeypatch):
    """The Ray session started before the token was set (a variable name of this test's own, so
    that nothing inherited it): a worker with the options of a role actor finds the token, and its
    runtime_env holds only a path."""
    import ray

    def worker_view(token_env: str):
        """What the worker sees: its runtime_env, its own env var, the token it loads."""
        import ray

        from keel.transport.security import load_token

        loaded = load_token(GrpcConfig(token_env=token_env))
        return ray.get_runtime_context().runtime_env, os.environ.get(token_env), loaded

    from keel.controller.actors import actor_options
    from keel.controller.channels import grpc_token_env

    name = "KEEL_TEST_HANDOVER_TOKEN"
    monkeypatch.setenv(name, TOKEN)
    cfg = _run_config(weights="grpc", grpc={"token_env": name})
    options = actor_options(cfg.rollout.resources.model_copy(update={"num_cpus": 0.01}), grpc_token_env(cfg))
    assert TOKEN not in json.dumps(options)

    task = ray.remote(worker_view).options(num_cpus=0.01, runtime_env=options["runtime_env"], max_retries=0)
    runtime_env, inherited, loaded = ray.get(task.remote(name), timeout=120)
    assert inherited is None and loaded == TOKEN
    assert TOKEN not in json.dumps(runtime_env) and f"{name}_FILE" in runtime_env["env_vars"]


def test_keel_submit_refuses_a_runtime_env_that_holds_the_token(tmp_path, capsys):
    from keel.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {policy: p}\ndata: {prompts: prompts.jsonl}\n"
        "reward: {source: {type: function, function: 'keel.reward.rules:arithmetic'}}\n"
        "transport: {weights: grpc}\n"
    )
    env_file = tmp_path / "env.yaml"
    env_file.write_text(f"env_vars: {{KEEL_GRPC_TOKEN: {TOKEN}, OTHER: x}}\n")
    # an address nothing listens on: the refusal comes before any request
    code = main(["submit", "--address", "http://127.0.0.1:9", "--config", str(config), "--runtime-env", str(env_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--runtime-env {env_file}: env_vars holds $KEEL_GRPC_TOKEN, the gRPC token" in err
    assert TOKEN not in err
