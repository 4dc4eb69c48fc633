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
