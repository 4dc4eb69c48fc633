"""docs/config.md is generated from the config models (scripts/gen_config_docs.py): the committed
file must be what the models give now, list every field of every section, and change when a field
does."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1].parent
SCRIPT = ROOT / "scripts" / "gen_config_docs.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_up_to_date():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_field_of_every_section_is_listed():
    from keel.config import CONFIG_KINDS

    gen = _generator()
    text = gen.render()
    for kind, root in CONFIG_KINDS.items():
        sections: list = []
        gen._models(root, "", sections)
        for path, label, model in sections:
            title = (f"### {kind}: {path}" if path else f"### {kind}: top level") + (f" ({label})" if label else "")
            body = text.split(title + "\n", 1)[1].split("\n### ", 1)[0]
            for name in model.model_fields:
                assert f"| `{name}` |" in body, f"{title}: {name}"


def test_a_changed_description_makes_the_reference_stale(monkeypatch):
    from keel.config import ControllerConfig

    gen = _generator()
    before = gen.render()
    monkeypatch.setattr(ControllerConfig.model_fields["max_restarts"], "description", "something else")
    after = gen.render()
    assert before != after and "| `max_restarts` | int | `0` | something else |" in after
