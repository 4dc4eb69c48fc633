"""Constitution files (keel/constitution.py): the example loads, and a bad file is refused naming
the file, the principle's index and the field."""

from __future__ import annotations

import pytest
import yaml

from keel.constitution import ConstitutionError, check_template, load_constitution

ROOT_EXAMPLE = "deploy/constitutions/example.yaml"
GOOD = {"name": "a", "critique": "find fault", "revision": "fix it", "question": "Is it fine? Answer Yes or No."}


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_example_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    c = load_constitution(root / ROOT_EXAMPLE)
    assert [p.name for p in c.principles] == ["harmless", "helpful", "concise"]
    assert all("Answer Yes or No" in p.question for p in c.principles)


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"principles": [GOOD, {k: v for k, v in GOOD.items() if k != "question"} | {"name": "b"}]},
            "principles[1].question: required field missing",
        ),
        ({"principles": [GOOD | {"critque": "x"}]}, "principles[0].critque: unknown key"),
        ({"principles": [GOOD | {"revision": "  "}]}, "principles[0].revision: must not be blank"),
        ({"principles": []}, "principles: List should have at least 1 item"),
        ({"principles": [GOOD, GOOD]}, "principles[1].name: 'a' is the name of principles[0]"),
        ([GOOD], "expected a mapping with a list of principles"),
    ],
)
def test_a_bad_constitution_names_the_file_principle_and_field(tmp_path, data, expected):
    path = _write(tmp_path / "c.yaml", data)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_a_missing_file_and_an_unknown_principle(tmp_path):
    with pytest.raises(ConstitutionError, match="nope.yaml: cannot read file"):
        load_constitution(tmp_path / "nope.yaml")
    c = load_constitution(_write(tmp_path / "c.yaml", {"principles": [GOOD, GOOD | {"name": "b"}]}))
    assert [p.name for p in c.select(["b", "a"], "x")] == ["b", "a"]
    with pytest.raises(
        ConstitutionError, match=r"cai.principles: no principle named 'z' \(the file has \['a', 'b'\]\)"
    ):
        c.select(["a", "z"], "cai.principles")


def test_templates_offer_only_their_placeholders():
    assert check_template("{prompt}{{literal}}{response}", ("prompt", "response"))
    with pytest.raises(ValueError, match=r"unknown placeholder \{answer\}: a template can use \{prompt\}"):
        check_template("{prompt} {answer}", ("prompt",))
    with pytest.raises(ValueError, match="not a valid template"):
        check_template("{prompt", ("prompt",))
