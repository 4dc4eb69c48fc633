"""`keel cai` (keel/cai.py): the critique and revision prompts are built from the principles, skips
are counted, and on the tiny model the command writes SFT rows keel sft trains on and pairs keel
dpo's loader reads; a bad field stops it before anything starts."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from keel.cai import Item, critique_prompt, draw_principles, revision_prompt, run_batch
from keel.config import CaiConfig
from keel.constitution import Principle

P1 = Principle(name="kind", critique="Say how it is unkind.", revision="Make it kind.", question="Kind?")
P2 = Principle(name="brief", critique="Say what is too long.", revision="Make it brief.", question="Brief?")
CONSTITUTION = {"principles": [P1.model_dump(), P2.model_dump()]}


def _cfg(tmp_path, **cai) -> CaiConfig:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    return CaiConfig.model_validate(
        {
            "model": {"policy": "p"},
            "data": {"prompts": "x.jsonl"},
            "cai": {"constitution": str(tmp_path / "c.yaml"), **cai},
        }
    )


def test_the_critique_and_revision_prompts_are_built_from_the_principle(tmp_path):
    cfg = _cfg(tmp_path)
    assert critique_prompt(cfg.cai.critique_template, P1, "hi ", "go away") == (
        "hi go away\n\nCritique request: Say how it is unkind.\nCritique:"
    )
    assert revision_prompt(cfg.cai.revision_template, P1, "hi ", "go away", " rude") == (
        "hi go away\n\nCritique request: Say how it is unkind.\nCritique:  rude\n\n"
        "Revision request: Make it kind.\nRevision:"
    )
    custom = "[{principle}] {revision_request} {critique} {critique_request} {prompt}/{response}"
    assert revision_prompt(custom, P2, "q", "a", "c") == "[brief] Make it brief. c Say what is too long. q/a"


def test_principles_are_drawn_with_the_seed_without_repeats():
    a = draw_principles([P1, P2], 2, seed=3, count=50)
    assert a == draw_principles([P1, P2], 2, seed=3, count=50)
    assert all(sorted(p.name for p in ps) == ["brief", "kind"] for ps in a)
    assert len({tuple(p.name for p in ps) for ps in a}) == 2  # both orders occur


class Scripted:
    """A generator that answers from a script and records what it was asked."""

    def __init__(self, answer):
        self.answer = answer
        self.asked: list[tuple[str, bool]] = []

    def __call__(self, prompts, seed, critic):
        self.asked += [(p.text, critic) for p in prompts]
        return [self.answer(p.text, critic) for p in prompts]


def test_revisions_chain_through_the_principles_and_skips_are_counted(tmp_path, tiny_model_dir):
    from keel.data.prompts import Prompt
    from keel.models.loading import load_tokenizer

    cfg = _cfg(tmp_path, principles_per_prompt=2, max_context_tokens=200)
    tok = load_tokenizer(str(tiny_model_dir))

    def answer(text, critic):
        if not critic:
            return {"a": "x", "b": "same", "c": "y", "d": "long " * 100}[text]
        if text.endswith("Critique:"):
            return " crit"
        if text.startswith("c"):
            return "   "  # a blank revision
        if text.startswith("b"):
            return "same "  # unchanged, whitespace aside
        return text.count("Revision request") * "r"  # differs per step

    gen = Scripted(answer)
    prompts = [Prompt(pid, pid, (1,)) for pid in "abcd"]
    items = [Item(pid, pid, [P1, P2]) for pid in "abcd"]
    run_batch(items, prompts, gen, 0, tok, cfg)
    a, b, c, d = items
    assert (a.skipped, b.skipped, c.skipped, d.skipped) == (None, "unchanged", "blank", "overlong")
    # a: the first revision revises the original, the second revises the first revision
    assert [s.principle for s in a.steps] == ["kind", "brief"]
    assert a.steps[0].critique_prompt == critique_prompt(cfg.cai.critique_template, P1, "a", "x")
    assert a.steps[1].critique_prompt == critique_prompt(cfg.cai.critique_template, P2, "a", "r")
    assert a.steps[1].revision_prompt == revision_prompt(cfg.cai.revision_template, P2, "a", "r", " crit")
    assert a.current == "r" and a.original == "x"
    assert len(c.steps) == 1  # a blank revision ends the chain
    assert not any(text.startswith("d") for text, critic in gen.asked if critic)  # too long: never asked


def test_keel_cai_writes_rows_keel_sft_trains_on_and_keel_dpo_reads(tiny_model_dir, tmp_path):
    from keel.cli import main
    from keel.config import PreferenceDataConfig, SFTDataConfig
    from keel.data.preference import build_pairs
    from keel.data.rows import read_rows
    from keel.data.sft import build_sft_examples
    from keel.models.loading import load_tokenizer
    from tests.unit.test_cli import KEEL, _yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(6)))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    cfg = {
        "model": {"policy": str(tiny_model_dir), "max_prompt_tokens": 16},
        "data": {"prompts": str(prompts)},
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        "cai": {"constitution": str(tmp_path / "c.yaml"), "principles_per_prompt": 2, "batch_size": 4},
    }
    out = tmp_path / "cai"
    assert main(["cai", "--config", _yaml(tmp_path / "cai.yaml", cfg), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["preferences.jsonl", "sft.jsonl", "trace.jsonl"]  # no tmp left

    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert [t["prompt"] for t in trace] == [f"{i}+{i}=" for i in range(6)]
    by_name = {p.name: p for p in (P1, P2)}
    for t in trace:
        for j, step in enumerate(t["steps"]):
            principle = by_name[step["principle"]]
            before = t["original"] if j == 0 else t["steps"][j - 1]["revision"]
            assert step["critique_prompt"] == critique_prompt(
                CaiConfig.model_fields["cai"].annotation.model_fields["critique_template"].default,
                principle,
                t["prompt"],
                before,
            )
            assert principle.critique in step["revision_prompt"] and principle.revision in step["revision_prompt"]
            assert step["revision_prompt"].endswith(
                f"Critique: {step['critique']}\n\nRevision request: {principle.revision}\nRevision:"
            )
    sft_rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    kept = [t for t in trace if t["skipped"] is None]
    assert len(sft_rows) == len(kept) > 0
    for row, t in zip(sft_rows, kept, strict=True):
        assert row["prompt"] == t["prompt"] and row["response"] == t["steps"][-1]["revision"] != t["original"]
        assert row["original"] == t["original"] and len(row["principles"]) == 2

    tok = load_tokenizer(str(tiny_model_dir))
    sft = build_sft_examples(read_rows(str(out / "sft.jsonl")), SFTDataConfig(path="x", max_tokens=512), tok)
    assert len(sft.examples) == len(sft_rows)
    pairs = build_pairs(read_rows(str(out / "preferences.jsonl")), PreferenceDataConfig(path="x", max_tokens=512), tok)
    assert [(p.chosen, p.rejected) for p in pairs.pairs] == [(r["response"], r["original"]) for r in sft_rows]

    sft_cfg = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"path": str(out / "sft.jsonl"), "max_tokens": 512},
        "trainer": {"micro_batch_size": 1},
        "train": {"batch_size": 1, "max_steps": 1},
        "logging": {"trackers": []},
    }
    done = subprocess.run(
        [KEEL, "sft", "--config", _yaml(tmp_path / "sft.yaml", sft_cfg), "--out", str(tmp_path / "sft")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote sft model to {tmp_path / 'sft'}" in done.stdout


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"cai": {"principles_per_prompt": 3}}, "cai.principles_per_prompt: 3 drawn per prompt from 2 principles"),
        ({"cai": {"principles": ["kind", "rude"]}}, "cai.principles: no principle named 'rude'"),
        (
            {"cai": {"critique_template": "{prompt} {revision}"}},
            "cai.critique_template: unknown placeholder {revision}",
        ),
        ({"sampling": {"n": 2}}, "sampling.n: keel cai draws one answer per prompt and step"),
        ({"cai": {"critic": "nowhere"}}, "cai.critic: nowhere does not exist"),
        ({"cai": {"constitution": "bad.yaml"}}, "cai.constitution: bad.yaml: principles[0].question: required field"),
    ],
)
def test_a_bad_field_stops_keel_cai_before_anything_starts(tiny_model_dir, tmp_path, capsys, change, expected):
    from keel.cli import main
    from tests.unit.test_cli import _yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({"principles": [{"name": "a", "critique": "c", "revision": "r"}]})
    )
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1="}\n')
    cfg = {
        "model": {"policy": str(tiny_model_dir)},
        "data": {"prompts": "prompts.jsonl"},
        "cai": {"constitution": "c.yaml"},
    }
    for key, value in change.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(["cai", "--config", _yaml(tmp_path / "cai.yaml", cfg), "--out", "out"])
    finally:
        os.chdir(here)
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
