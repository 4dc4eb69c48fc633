"""The run config: valid examples load, every kind of bad input is one clear line naming the field."""

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from keel.config import (
    CONFIG_KINDS,
    ConfigError,
    config_schema,
    dump_config,
    load_config,
    max_model_len,
    parse_config,
    reference_path,
    rollout_batch_size,
    uses_critic,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "configs").glob("*.yaml"))

MINIMAL = {
    "model": {"policy": "p"},
    "data": {"prompts": "prompts.jsonl"},
    "reward": {"source": {"type": "function", "function": "keel.reward.rules:arithmetic"}},
}


def _with(**overrides):
    """MINIMAL with nested overrides given as dotted keys: _with(**{"rollout.replicas": 0})."""
    data = json.loads(json.dumps(MINIMAL))
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def _errors(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    return info.value.lines


def test_examples_exist_and_load():
    assert len(EXAMPLES) >= 8
    for path in EXAMPLES:
        kind = path.stem if path.stem in CONFIG_KINDS else "train"
        assert isinstance(load_config(path, CONFIG_KINDS[kind]), CONFIG_KINDS[kind]), path


def test_demo_stage_configs_are_the_examples():
    """keel demo runs exactly the configs deploy/configs documents (for runs/demo)."""
    from keel.demo import DemoPlan, stage_configs

    base = Path("runs/demo")
    data = {k: base / "data" / f"{k}.jsonl" for k in ("sft", "pairs", "pairs_eval", "prompts", "eval_prompts")}
    built = stage_configs(base, DemoPlan(), data)
    for stage, kind in (("sft", "sft"), ("rm", "rm"), ("dpo", "dpo"), ("eval", "eval"), ("ppo", "train")):
        example = load_config(ROOT / "deploy" / "configs" / f"{stage}.yaml", CONFIG_KINDS[kind])
        assert example == built[stage], stage


def test_minimal_config_fills_defaults_and_derived_values():
    cfg = parse_config(MINIMAL)
    assert cfg.rollout.replicas == 1 and cfg.algorithm.estimator == "gae"
    assert rollout_batch_size(cfg) == 16
    assert uses_critic(cfg)
    assert reference_path(cfg) == "p"
    assert max_model_len(cfg) == 128 + 64


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


def test_dump_round_trips():
    cfg = load_config(ROOT / "deploy" / "configs" / "demo.yaml")
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"model.dtyp": "float32"}, "model.dtyp: unknown key"),
        ({"rollout.replicas": 0}, "rollout.replicas: Input should be greater than or equal to 1 (got 0)"),
        ({"reference.replicas": 0}, "reference.replicas: Input should be greater than or equal to 1"),
        ({"learner.optimizer.lr": -0.1}, "learner.optimizer.lr: Input should be greater than 0 (got -0.1)"),
        ({"rollout.sampling.temperature": "hot"}, "rollout.sampling.temperature: Input should be a valid number"),
        ({"rollout.sampling.top_p": 1.5}, "rollout.sampling.top_p: Input should be less than or equal to 1"),
        ({"learner.deepspeed.zero_stage": 4}, "learner.deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        ({"algorithm.estimator": "ppo2"}, "algorithm.estimator: Input should be 'gae', 'grpo'"),
        (
            {"reward.source": {"type": "function", "function": "nocolon"}},
            'reward.source.function: must look like "package.module:function"',
        ),
        ({"reward.source": {"type": "model"}}, "reward.source.path: required field missing"),
        ({"reward.source": {"type": "magic"}}, "reward.source: Input tag 'magic' found using 'type' does not match"),
        (
            {"rollout.resources.custom": {"rollout": -1}},
            "rollout.resources.custom: Value error, custom resource 'rollout' must be >= 0",
        ),
        ({"learner.optimizer.betas": [0.9, 1.0]}, "learner.optimizer.betas: each beta must be in [0, 1)"),
        ({"algorithm.dual_clip": 1.0}, "algorithm.dual_clip: Input should be greater than 1"),
        ({"transport.grpc.tls_cert": "c.pem"}, "transport.grpc: tls_cert and tls_key must be set together"),
        (
            {"transport.grpc.reward_address": "reward-server"},
            "transport.grpc: reward_address must look like host:port, got 'reward-server'",
        ),
        (
            {"transport.grpc.weight_port": 70000},
            "transport.grpc.weight_port: Input should be less than or equal to 65535",
        ),
        ({"transport.weights": "http"}, "transport.weights: Input should be 'objectstore' or 'grpc'"),
        ({"bogus": 1}, "bogus: unknown key"),
    ],
)
def test_bad_field_is_named(overrides, expected):
    lines = _errors(_with(**overrides))
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected.replace("Value error, ", "")), lines[0]
    assert "\n" not in lines[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"algorithm.estimator": "grpo"},
            "rollout.sampling.n: estimator grpo compares samples of a prompt: needs n >= 2, got 1",
        ),
        ({"algorithm.estimator": "rloo", "rollout.sampling.n": 4}, None),
        ({"reference.enabled": False}, "reference.enabled: algorithm.kl.coef is 0.05 but the reference is disabled"),
        (
            {"controller.max_staleness": 2},
            "controller.max_staleness: sync mode is strictly on-policy: max_staleness must be 0",
        ),
        ({"controller.mode": "async", "controller.max_staleness": 2}, None),
        (
            {"algorithm.mini_batch_size": 5},
            "algorithm.mini_batch_size: 5 must divide the rollout batch (16 prompts x 1 samples = 16)",
        ),
        (
            {"learner.micro_batch_size": 3},
            "algorithm.mini_batch_size: 16 must split into equal shares of whole micro-batches on every rank: a "
            "multiple of learner.micro_batch_size x learner.replicas (3 x 1 = 3)",
        ),
        (  # validated before, then drifted: 16 samples on 3 ranks
            {"learner.replicas": 3, "learner.micro_batch_size": 1},
            "algorithm.mini_batch_size: 16 must split into equal shares of whole micro-batches on every rank: a "
            "multiple of learner.micro_batch_size x learner.replicas (1 x 3 = 3)",
        ),
        (  # 6 samples on 4 ranks: an IndexError on the last rank before
            {
                "learner.replicas": 4,
                "learner.micro_batch_size": 1,
                "algorithm.mini_batch_size": 6,
                "controller.prompts_per_step": 6,
            },
            "algorithm.mini_batch_size: 6 must split into equal shares of whole micro-batches on every rank: a "
            "multiple of learner.micro_batch_size x learner.replicas (1 x 4 = 4)",
        ),
        ({"learner.replicas": 2, "learner.micro_batch_size": 4, "algorithm.mini_batch_size": 8}, None),
        (
            {"algorithm.kl": {"estimator": "k1", "placement": "loss"}},
            "algorithm.kl.estimator: k1 with placement loss has zero expected gradient (E[grad log pi] = 0), so the "
            "KL term would do nothing: use k3 (or k2), or placement reward",
        ),
        ({"algorithm.kl": {"estimator": "k2", "placement": "loss"}}, None),
        (
            {"controller.mode": "async", "controller.max_staleness": 1, "rollout.sampling.top_p": 0.9},
            "rollout.sampling.top_p: async mode takes the PPO ratio against the sampler's log-probs, and with "
            "top_p < 1 or top_k > 0 those are of the truncated distribution, not the policy's: use top_p 1 and "
            "top_k 0, or sync mode",
        ),
        (
            {"controller.mode": "async", "controller.max_staleness": 1, "rollout.sampling.top_k": 20},
            "rollout.sampling.top_k: async mode takes the PPO ratio against the sampler's log-probs, and with "
            "top_p < 1 or top_k > 0 those are of the truncated distribution, not the policy's: use top_p 1 and "
            "top_k 0, or sync mode",
        ),
        ({"rollout.sampling.top_p": 0.9, "rollout.sampling.top_k": 20}, None),  # sync recomputes pi_old
        ({"checkpoint.resume": False, "checkpoint.save_hf": False}, None),
        ({"rollout.replicas": 32}, "rollout.replicas: 32 workers but only 16 prompts per step"),
        (
            {"transport.grpc.reward_address": "rm.keel.svc:50051", "transport.grpc.tls_ca": "ca.pem"},
            "transport.reward: grpc.reward_address is set, so the reward channel must be grpc (got objectstore)",
        ),
        (
            {
                "transport.grpc.reward_address": "rm.keel.svc:50051",
                "transport.grpc.tls_ca": "ca.pem",
                "transport.reward": "grpc",
            },
            None,
        ),
    ],
)
def test_cross_field_rules_name_the_field(overrides, expected):
    data = _with(**overrides)
    if expected is None:
        parse_config(data)
        return
    assert _errors(data) == [expected]


def test_kl_estimator_follows_the_placement():
    from keel.config import kl_estimator

    assert kl_estimator(parse_config(_with()).algorithm.kl) == "k1"
    assert kl_estimator(parse_config(_with(**{"algorithm.kl": {"placement": "loss"}})).algorithm.kl) == "k3"
    cfg = parse_config(_with(**{"algorithm.kl": {"placement": "loss", "estimator": "k2"}}))
    assert kl_estimator(cfg.algorithm.kl) == "k2"


def test_literal_lists_equal_the_algo_registries():
    """config.py spells the names out (so it imports no torch); they must be the registries'."""
    from keel import config
    from keel.algo.advantages import CRITIC_ESTIMATORS, ESTIMATORS, GROUP_ESTIMATORS
    from keel.algo.kl import KL_ESTIMATORS
    from keel.algo.masked import LOSS_AGGREGATIONS

    assert config.ESTIMATORS == tuple(ESTIMATORS)
    assert config.GROUP_ESTIMATORS == GROUP_ESTIMATORS and config.CRITIC_ESTIMATORS == CRITIC_ESTIMATORS
    assert config.KL_ESTIMATORS == KL_ESTIMATORS and config.LOSS_AGGREGATIONS == LOSS_AGGREGATIONS
    schema = config_schema()["$defs"]
    assert tuple(schema["AlgorithmConfig"]["properties"]["estimator"]["enum"]) == tuple(ESTIMATORS)
    assert tuple(schema["AlgorithmConfig"]["properties"]["loss_agg"]["enum"]) == LOSS_AGGREGATIONS


def test_config_validate_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from keel.cli import main\n"
        f"rc = main(['config', 'validate', {str(ROOT / 'deploy' / 'configs' / 'demo.yaml')!r}])\n"
        "assert rc == 0, rc\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'deepspeed', 'vllm', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_several_problems_are_all_reported():
    lines = _errors(_with(**{"rollout.replicas": 0, "learner.optimizer.lr": -1, "model.extra": 1}))
    assert len(lines) == 3


def test_missing_required_sections():
    lines = _errors({"model": {"policy": "p"}})
    assert lines == ["data: required field missing", "reward: required field missing"]


def test_load_config_file_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {policy: p\ndata: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad_yaml)
    assert info.value.lines[0].startswith("malformed YAML: line 2, column 5")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(empty)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections, got int"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.yaml")


def test_schema_documents_every_field():
    schema = config_schema()
    assert schema["title"] == "RunConfig"
    undocumented = []
    for name, definition in schema["$defs"].items():
        for field, spec in definition.get("properties", {}).items():
            if name in ("RewardModelSource", "RewardFunctionSource") and field == "type":
                continue  # the union tag
            if "description" not in spec:
                undocumented.append(f"{name}.{field}")
    assert undocumented == []


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {
                "reward.replicas": 2,
                "transport.reward": "grpc",
                "transport.grpc.reward_address": "rm.keel.svc:50051",
                "transport.grpc.tls_ca": "ca.pem",
            },
            "reward.replicas: 2 reward actors, but transport.grpc.reward_address names an external server that "
            "scores every batch (scale that server instead): must be 1",
        ),
        ({"logging.eval_every": 2}, "logging.eval_every: 2, but there is no data.eval_prompts to evaluate on"),
        (
            {"data.eval_task_metric": "keel.reward.rules:arithmetic_exact"},
            "data.eval_task_metric: is set, but there is no data.eval_prompts to evaluate it on",
        ),
        ({"data.eval_task_metric": "exact"}, 'data.eval_task_metric: must look like "package.module:function"'),
        ({"logging.eval_every": -1}, "logging.eval_every: Input should be greater than or equal to 0"),
        (
            {
                "data.eval_prompts": "eval.jsonl",
                "data.eval_task_metric": "keel.reward.rules:arithmetic_exact",
                "logging.eval_every": 5,
                "reward.replicas": 2,
                "reference.replicas": 3,
                "transport.reward": "grpc",
            },
            None,
        ),
    ],
)
def test_replicas_and_held_out_evaluation_rules(overrides, expected):
    data = _with(**overrides)
    if expected is None:
        parse_config(data)
        return
    lines = _errors(data)
    assert len(lines) == 1 and lines[0].startswith(expected), lines


# --------------------------------------------------------------------------- several rewards (reward.sources)

_CORRECT = {"type": "function", "function": "keel.reward.rules:arithmetic"}
_LENGTH = {"type": "function", "function": "keel.reward.rules:length_penalty", "weight": 0.5}


def _sources(*sources, **reward):
    return _with(reward={"sources": list(sources), **reward})


def test_several_sources_load_with_names_weights_and_normalisation():
    from keel.config import reward_sources, source_name

    server = {"type": "server", "address": "127.0.0.1:50051", "name": "judge", "normalize": "whiten"}
    cfg = parse_config(_sources(_CORRECT, {**_LENGTH, "normalize": "clip", "clip": 0.5}, server))
    sources = reward_sources(cfg.reward)
    assert [source_name(s) for s in sources] == ["arithmetic", "length_penalty", "judge"]
    assert [(s.weight, s.normalize, s.clip) for s in sources] == [
        (1.0, "none", None),
        (0.5, "clip", 0.5),
        (1.0, "whiten", None),
    ]
    assert cfg.reward.source is None
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg  # the run directory's snapshot loads again
    one = parse_config(MINIMAL).reward  # a single source is the one-element case
    assert [source_name(s) for s in reward_sources(one)] == ["arithmetic"]


@pytest.mark.parametrize(
    "data, expected",
    [
        (_with(reward={}), "reward.source: required: give reward.source (one) or reward.sources (several)"),
        (
            _with(**{"reward.sources": [_LENGTH]}),
            "reward.sources: set together with reward.source: give one of the two",
        ),
        (_sources(), "reward.sources: List should have at least 1 item"),
        (_sources(_CORRECT, {**_LENGTH, "weight": "inf"}), "reward.sources[1].weight: Input should be a finite number"),
        (_sources(_CORRECT, {**_LENGTH, "weight": float("nan")}), "reward.sources[1].weight: Input should be a finite"),
        (
            _sources(_CORRECT, {**_CORRECT, "weight": 2.0}),
            "reward.sources[1].name: 'arithmetic' is the name of reward.sources[0] too: names key the metrics",
        ),
        (
            _sources({**_CORRECT, "name": "x"}, {**_LENGTH, "name": "x"}),
            "reward.sources[1].name: 'x' is the name of reward.sources[0] too",
        ),
        (_sources({**_LENGTH, "name": "len gth"}), "reward.sources[0].name: must start with a letter"),
        (
            _sources({**_LENGTH, "normalize": "zscore"}),
            "reward.sources[0].normalize: Input should be 'none', 'whiten' or 'clip' (got 'zscore')",
        ),
        (_sources({**_LENGTH, "normalize": "clip"}), "reward.sources[0]: normalize: clip needs a bound"),
        (_sources({**_LENGTH, "clip": 1.0}), "reward.sources[0]: clip is set but normalize is none"),
        (
            _sources({**_LENGTH, "normalize": "clip", "clip": 0}),
            "reward.sources[0].clip: Input should be greater than 0",
        ),
        (_sources({**_CORRECT, "function": "nocolon"}), 'reward.sources[0].function: must look like "package.module'),
        (_sources({"type": "server"}), "reward.sources[0].address: required field missing"),
        (_sources({"type": "server", "address": "rm"}), "reward.sources[0].address: must look like host:port"),
        (_sources({"type": "magic"}), "reward.sources[0]: Input tag 'magic' found using 'type' does not match"),
        (
            _sources(_CORRECT, {"type": "server", "address": "rm.keel.svc:50051"}),
            "reward.sources[1].address: 'rm.keel.svc:50051' is not a loopback address and TLS is off, so the bearer "
            "token would cross the network in clear text",
        ),
        (
            {
                **_sources(_CORRECT),
                "transport": {"reward": "grpc", "grpc": {"reward_address": "127.0.0.1:50051"}},
            },
            "reward.sources: transport.grpc.reward_address names an external server that gives the whole reward",
        ),
    ],
)
def test_bad_sources_are_named(data, expected):
    lines = _errors(data)
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_a_remote_server_source_is_fine_with_tls_or_allow_insecure():
    remote = {"type": "server", "address": "rm.keel.svc:50051"}
    parse_config({**_sources(_CORRECT, remote), "transport": {"grpc": {"tls_ca": "ca.pem"}}})
    parse_config({**_sources(_CORRECT, remote), "transport": {"grpc": {"allow_insecure": True}}})
    parse_config({**_sources(_CORRECT, remote), "transport": {"grpc": {"auth": False}}})


# --------------------------------------------------------------------------- gRPC: no clear text off loopback, mTLS

_INSECURE_HOST = (
    "transport.grpc: host '0.0.0.0' is not a loopback address, so the servers need auth and TLS, but {missing} "
    "is off: turn it on, bind 127.0.0.1, or set allow_insecure: true"
)
_CLEAR_TOKEN = (
    "transport.grpc: reward_address '{address}' is not a loopback address and TLS is off, so the bearer token would "
    "cross the network in clear text: set tls_ca (the CA of the server's certificate), or allow_insecure: true"
)
_SERVER_TLS = {"transport.grpc.tls_cert": "server.pem", "transport.grpc.tls_key": "server.key"}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # servers bound beyond loopback need auth and TLS
        ({"transport.grpc.host": "0.0.0.0"}, _INSECURE_HOST.format(missing="TLS (tls_cert, tls_key)")),
        (
            {"transport.grpc.host": "0.0.0.0", "transport.grpc.auth": False},
            _INSECURE_HOST.format(missing="auth and TLS (tls_cert, tls_key)"),
        ),
        (
            {"transport.grpc.host": "0.0.0.0", "transport.grpc.auth": False, **_SERVER_TLS},
            _INSECURE_HOST.format(missing="auth"),
        ),
        ({"transport.grpc.host": "0.0.0.0", **_SERVER_TLS}, None),
        ({"transport.grpc.host": "::", **_SERVER_TLS}, None),
        (
            {"transport.grpc.advertise_host": "10.0.0.7"},
            "transport.grpc: advertise_host '10.0.0.7' is not a loopback address, so the servers need auth and TLS, "
            "but TLS (tls_cert, tls_key) is off: turn it on, bind 127.0.0.1, or set allow_insecure: true",
        ),
        ({"transport.grpc.host": "127.0.0.2", "transport.grpc.auth": False}, None),  # all of 127.0.0.0/8
        ({"transport.grpc.host": "localhost", "transport.grpc.advertise_host": "::1"}, None),
        # a token sent to a non-loopback reward server needs TLS
        (
            {"transport.reward": "grpc", "transport.grpc.reward_address": "rm.keel.svc:50051"},
            _CLEAR_TOKEN.format(address="rm.keel.svc:50051"),
        ),
        (
            {"transport.reward": "grpc", "transport.grpc.reward_address": "10.1.2.3:50051"},
            _CLEAR_TOKEN.format(address="10.1.2.3:50051"),
        ),
        (
            {"transport.reward": "grpc", "transport.grpc.reward_address": "rm:50051", "transport.grpc.tls_ca": "ca"},
            None,
        ),
        ({"transport.reward": "grpc", "transport.grpc.reward_address": "rm:50051", "transport.grpc.auth": False}, None),
        ({"transport.reward": "grpc", "transport.grpc.reward_address": "[::1]:50051"}, None),
        ({"transport.reward": "grpc", "transport.grpc.reward_address": "localhost:50051"}, None),
        # allow_insecure lifts both rules
        (
            {
                "transport.reward": "grpc",
                "transport.grpc.reward_address": "rm.keel.svc:50051",
                "transport.grpc.host": "0.0.0.0",
                "transport.grpc.auth": False,
                "transport.grpc.allow_insecure": True,
            },
            None,
        ),
        (
            {
                "transport.reward": "grpc",
                "transport.grpc.reward_address": "rm:50051",
                "transport.grpc.allow_insecure": True,
            },
            None,
        ),
        # mutual TLS settings come in pairs, and need server TLS
        (
            {"transport.grpc.tls_client_ca": "ca.pem"},
            "transport.grpc: tls_client_ca needs tls_cert and tls_key: servers check client certificates over TLS",
        ),
        (
            {"transport.grpc.tls_client_cert": "client.pem"},
            "transport.grpc: tls_client_cert and tls_client_key must be set together",
        ),
        (
            {
                **_SERVER_TLS,
                "transport.grpc.tls_client_ca": "ca.pem",
                "transport.grpc.tls_client_cert": "client.pem",
                "transport.grpc.tls_client_key": "client.key",
            },
            None,
        ),
    ],
)
def test_grpc_refuses_clear_text_beyond_loopback_unless_allowed(overrides, expected):
    data = _with(**overrides)
    if expected is None:
        parse_config(data)
        return
    assert _errors(data) == [expected]


def test_serve_reward_config_obeys_the_same_rule():
    """`keel serve reward` reads a RewardServerConfig, whose grpc section is the same GrpcConfig."""
    from keel.config import validation_error_lines
    from keel.reward.server import RewardServerConfig

    data = yaml.safe_load((ROOT / "deploy" / "servers" / "reward.yaml").read_text())
    RewardServerConfig.model_validate(data)
    exposed = {**data, "grpc": {**data["grpc"], "host": "0.0.0.0", "auth": False}}
    with pytest.raises(ValidationError) as info:
        RewardServerConfig.model_validate(exposed)
    assert validation_error_lines(info.value) == [
        "grpc: host '0.0.0.0' is not a loopback address, so the servers need auth and TLS, but auth and TLS "
        "(tls_cert, tls_key) is off: turn it on, bind 127.0.0.1, or set allow_insecure: true"
    ]
    mtls = {"host": "0.0.0.0", "tls_cert": "s.pem", "tls_key": "s.key", "tls_client_ca": "ca.pem"}
    RewardServerConfig.model_validate({**data, "grpc": {**data["grpc"], **mtls}})
    RewardServerConfig.model_validate({**data, "grpc": {**data["grpc"], **exposed["grpc"], "allow_insecure": True}})


def test_grpc_example_sets_server_tls_for_its_exposed_servers():
    """ppo_grpc_reward.yaml binds beyond loopback (its WeightService), so it carries the job's own
    server certificate, and mutual TLS for its clients."""
    grpc_cfg = load_config(ROOT / "deploy" / "configs" / "ppo_grpc_reward.yaml").transport.grpc
    assert grpc_cfg.host == "0.0.0.0" and grpc_cfg.auth and not grpc_cfg.allow_insecure
    assert grpc_cfg.tls_cert and grpc_cfg.tls_key and grpc_cfg.tls_ca
    assert grpc_cfg.tls_client_ca and grpc_cfg.tls_client_cert and grpc_cfg.tls_client_key


@pytest.mark.parametrize(
    "kind, logging, expected",
    [
        ("train", {"trackers": ["wandb", "mlflow", "wandb"]}, "logging.trackers: wandb is listed more than once"),
        ("train", {"trackers": ["neptune"]}, "logging.trackers[0]: Input should be 'tensorboard', 'wandb' or 'mlflow'"),
        ("train", {"wandb": {"project": "p"}}, "logging.wandb: set, but logging.trackers does not list wandb"),
        ("sft", {"trackers": ["wandb"], "mlflow": {"experiment": "e"}}, "logging.mlflow: set, but logging.trackers"),
        ("sft", {"trackers": ["wandb"], "mlflow": {"tracking_uri": None}}, None),  # as a config dump writes it
        ("dpo", {"trackers": ["wandb"], "wandb": {"mode": "cloud"}}, "logging.wandb.mode: Input should be 'offline'"),
        ("rm", {"trackers": ["mlflow"], "mlflow": {"experiment": ""}}, "logging.mlflow.experiment: String should"),
        ("train", {"trackers": []}, None),
        (
            "sft",
            {
                "console": "rich",
                "trackers": ["tensorboard", "wandb", "mlflow"],
                "wandb": {"project": "p", "entity": "team", "mode": "online"},
                "mlflow": {"tracking_uri": "http://mlflow:5000", "experiment": "e"},
            },
            None,
        ),
    ],
)
def test_logging_trackers_are_each_listed_once_and_configured_only_when_listed(kind, logging, expected):
    data = {"model": {"path": "m"}, "data": {"path": "d"}} if kind != "train" else _with()
    data["logging"] = logging
    if expected is None:
        cfg = parse_config(data, schema=CONFIG_KINDS[kind])
        assert cfg.logging.trackers == logging["trackers"]
        assert parse_config(yaml.safe_load(dump_config(cfg)), schema=CONFIG_KINDS[kind]) == cfg
        return
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml", CONFIG_KINDS[kind])
    assert len(info.value.lines) == 1 and info.value.lines[0].startswith(expected), info.value.lines


# --------------------------------------------------------------------------- model.lora

GRPO = {"algorithm.estimator": "grpo", "rollout.sampling.n": 2}


@pytest.mark.parametrize(
    "lora, expected",
    [
        ({"rank": 0}, "model.lora.rank: Input should be greater than or equal to 1"),
        ({"alpha": 0}, "model.lora.alpha: Input should be greater than 0"),
        ({"dropout": 1.0}, "model.lora.dropout: Input should be less than 1"),
        ({"target_modules": []}, "model.lora.target_modules: List should have at least 1 item"),
        ({"target_modules": ["q_proj", " "]}, "model.lora.target_modules: module names must not be blank"),
        ({"target_modules": ["q_proj", "q_proj"]}, "model.lora.target_modules: a module is listed twice"),
        ({"rank": 4, "extra": 1}, "model.lora.extra: unknown key"),
    ],
)
def test_lora_fields_are_checked_by_name(lora, expected):
    lines = _errors(_with(**{"model.lora": lora, **GRPO}))
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_lora_defaults_and_null_is_off():
    cfg = parse_config(_with(**{"model.lora": {}, **GRPO}))
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.dropout) == (8, 16.0, 0.0)
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    from keel.config import reference_on_learner

    assert reference_on_learner(cfg)
    off = parse_config(_with(**{"model.lora": None}))
    assert off.model.lora is None and not reference_on_learner(off)
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, "algorithm.estimator: gae trains a critic, a second full copy of the model, which model.lora"),
        ({**GRPO, "learner.deepspeed.zero_stage": 3}, "learner.deepspeed.zero_stage: 3 with model.lora is not"),
        ({**GRPO, "model.lora.dropout": 0.1}, "model.lora.dropout: 0.1, but keel train turns dropout off"),
        ({**GRPO, "reference.model": "r"}, "reference.model: with model.lora the reference is the policy with its"),
        ({**GRPO, "reference.replicas": 2}, "reference.replicas: 2, but with model.lora the learner computes"),
    ],
)
def test_lora_refuses_what_it_does_not_support_naming_both_fields(overrides, expected):
    lines = _errors(_with(**{"model.lora": {"rank": 4}, **overrides}))
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "model.lora" in lines[0]


@pytest.mark.parametrize(
    "kind, extra, expected",
    [
        ("sft", {"model.lora": {"dropout": 0.1}}, None),  # dropout trains adapters in keel sft
        ("dpo", {"model.lora": {}}, None),
        ("sft", {"model.lora": {}, "trainer.deepspeed.zero_stage": 3}, "trainer.deepspeed.zero_stage: 3 with model"),
        ("dpo", {"model.lora": {}, "reference": "r"}, "reference: with model.lora the reference is model.path"),
        ("rm", {"model.lora": {}}, "model.lora: keel rm does not train LoRA adapters yet"),
    ],
)
def test_offline_lora(kind, extra, expected):
    data = {"model": {"path": "m"}, "data": {"path": "d"}}
    for dotted, value in extra.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if expected is None:
        assert parse_config(data, schema=CONFIG_KINDS[kind]).model.lora is not None
        return
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml", CONFIG_KINDS[kind])
    assert len(info.value.lines) == 1 and info.value.lines[0].startswith(expected), info.value.lines


BON = {**MINIMAL, "bon": {"n": 8}}
EVAL = {"checkpoints": [{"name": "a", "path": "a"}], "reference": "r", "data": {"prompts": "x"}}


@pytest.mark.parametrize(
    "kind, changes, expected",
    [
        ("bon", {"bon": {"n": 0}}, "bon.n: Input should be greater than or equal to 1 (got 0)"),
        ("bon", {"bon": {"n": 8, "keep": "worst"}}, "bon.keep: Input should be 'best' or 'threshold' (got 'worst')"),
        ("bon", {"bon": {"n": 8, "keep": "threshold"}}, "bon.threshold: required with bon.keep threshold"),
        ("bon", {"bon": {"n": 8, "threshold": 0.5}}, "bon.threshold: set, but bon.keep is best"),
        ("bon", {"bon": {"n": 8, "keep": "threshold", "threshold": "inf"}}, "bon.threshold: Input should be a finite"),
        ("bon", {"bon": {"n": 8, "max_prompts": -1}}, "bon.max_prompts: Input should be greater than or equal to 0"),
        ("bon", {"bon": {"n": 8, "prompts_per_round": 0}}, "bon.prompts_per_round: Input should be greater than"),
        ("bon", {"bon": {"n": 8, "out": "x"}}, "bon.out: unknown key"),
        ("bon", {"bon": None}, "bon: Input should be a valid dictionary"),
        ("bon", {"rollout": {"sampling": {"n": 4}}}, "rollout.sampling.n: bon.n draws 8 samples per prompt: leave"),
        ("bon", {"rollout": {"sampling": {"temperature": 0}}}, "rollout.sampling.temperature: greedy sampling"),
        ("bon", {"data": {"prompts": "x", "eval_prompts": "y"}}, "data.eval_prompts: keel bon samples data.prompts"),
        ("bon", {"learner": {}}, "learner: unknown key"),
        ("bon", {"model": {"policy": "p", "lora": {"rank": 4}}}, "model.lora: keel bon samples from a whole model"),
        ("eval", {"best_of_n": 8}, "best_of_n: the best of n samples is the highest-rewarded one: set reward"),
        ("eval", {"best_of_n": 1, "reward": MINIMAL["reward"]}, "best_of_n: Input should be greater than or equal"),
        ("eval", {"best_of_n": 4, "reward": MINIMAL["reward"], "sampling": {"n": 2}}, "sampling.n: best_of_n draws"),
        (
            "eval",
            {"best_of_n": 4, "reward": MINIMAL["reward"], "sampling": {"temperature": 0}},
            "sampling.temperature: greedy sampling (temperature 0) gives one answer per prompt: best_of_n 4 needs",
        ),
    ],
)
def test_best_of_n_fields_each_give_one_line_naming_the_field(kind, changes, expected):
    data = {**(BON if kind == "bon" else EVAL), **changes}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml", CONFIG_KINDS[kind])
    assert len(info.value.lines) == 1 and info.value.lines[0].startswith(expected), info.value.lines


def test_best_of_n_derived_values():
    from keel.config import bon_run_config, bon_sampling, eval_sampling

    cfg = parse_config(
        {**BON, "rollout": {"replicas": 20, "sampling": {"temperature": 0.7}}}, schema=CONFIG_KINDS["bon"]
    )
    assert bon_sampling(cfg).n == 8 and bon_sampling(cfg).temperature == 0.7 and cfg.rollout.sampling.n == 1
    run = bon_run_config(cfg)  # the roles start from these sections, as keel train's would
    assert (run.model, run.data, run.rollout, run.reward) == (cfg.model, cfg.data, cfg.rollout, cfg.reward)
    assert run.logging.trackers == []
    ev = parse_config({**EVAL, "best_of_n": 8, "reward": MINIMAL["reward"]}, schema=CONFIG_KINDS["eval"])
    assert eval_sampling(ev).n == 8 and eval_sampling(ev.model_copy(update={"best_of_n": None})).n == 1
