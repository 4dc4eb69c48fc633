"""Shared pytest setup. Heavy fixtures (a tiny model on disk) are session-scoped."""

from __future__ import annotations

import os

import pytest

# Deterministic, quiet CPU runs everywhere in the suite.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama causal LM + tokenizer, made once per test session."""
    from keel.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "policy")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (2 CPUs, like this machine)."""
    import ray

    from keel.controller.actors import ROLE_ENV

    # "local": a Ray of its own even when a cluster runs on this machine (the job tests start one)
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": ROLE_ENV}
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory):
    """The demo task: a warmed-up tiny policy and 512 addition prompts."""
    from keel.data.tasks import arithmetic_rows, write_jsonl
    from keel.models.tiny import make_tiny_model

    base = tmp_path_factory.mktemp("demo")
    policy = make_tiny_model(base / "policy", pretrain_steps=300)
    prompts = write_jsonl(arithmetic_rows(512), base / "prompts.jsonl")
    return policy, prompts


@pytest.fixture
def weight_address():
    """start(servicer) -> the address of a WeightService serving it on 127.0.0.1 (stopped after the test)."""
    from concurrent import futures

    import grpc

    from keel.transport.pb import weights_pb2_grpc

    servers = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        weights_pb2_grpc.add_WeightServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)
