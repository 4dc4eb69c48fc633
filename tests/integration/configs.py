"""The demo run config adjusted for the integration tests (HF rollout, dotted overrides)."""

from __future__ import annotations

from pathlib import Path

import yaml

from keel.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


def demo_config(policy, prompts, **sections):
    data = yaml.safe_load((ROOT / "deploy" / "configs" / "demo.yaml").read_text())
    data["model"]["policy"], data["data"]["prompts"] = str(policy), str(prompts)
    data["rollout"]["backend"] = "hf"
    for dotted, value in sections.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(data)
