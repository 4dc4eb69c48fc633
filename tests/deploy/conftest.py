"""Fixtures for the deploy tests: the helm and checkov binaries (fetched once into the tools
cache by scripts/fetch_tools.py), rendering the chart, and the schemas rendered objects must meet."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "keel"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RAW_RAYJOB = ROOT / "deploy" / "kubernetes" / "rayjob.yaml"
KUBERAY = Path(__file__).resolve().parent / "kuberay"
K8S_VERSION = "1.33.0"  # the Kubernetes version rendered objects are validated against
RELEASE, NAMESPACE = "ppo", "keel"


def _fetch_tools():
    spec = importlib.util.spec_from_file_location("fetch_tools", ROOT / "scripts" / "fetch_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> Path:
    return _fetch_tools().helm()


@pytest.fixture(scope="session")
def checkov() -> Path:
    return _fetch_tools().checkov()


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def template(helm: Path, *values: Path, sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return run_helm(helm, *args)


@pytest.fixture(scope="session")
def render(helm):
    """render(values_file_or_None) -> the rendered objects (cached per values file)."""

    @functools.cache
    def _render(values: Path | None) -> tuple[dict, ...]:
        out = template(helm, *([values] if values else []))
        assert out.returncode == 0, out.stderr
        return tuple(d for d in yaml.safe_load_all(out.stdout) if d)

    return _render


def strict(schema):
    """The schema with additionalProperties: false on every object that lists properties and says
    nothing about others, so that a misspelt field is an error (the API server would drop it)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            open_ = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
            if node.get("type") == "object" and "properties" in node and not open_:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def crd_schema(kind: str, strict_: bool = True) -> dict:
    schema = json.loads((KUBERAY / f"{kind.lower()}-v1.schema.json").read_text())
    return strict(schema) if strict_ else schema
