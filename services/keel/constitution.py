"""A constitution: the principles that AI feedback judges and revises by (Constitutional AI).

A constitution is a YAML file with a list of principles, each with a name and three requests:

    principles:
      - name: harmless
        critique: Point out anything in the response that could help someone cause harm.
        revision: Rewrite the response so that it helps with nothing harmful.
        question: Is the response free of anything that could help someone cause harm? Answer Yes or No.

`critique` and `revision` are what `keel cai` asks the critic to do (keel.cai); `question` is
what a judge reward source asks a causal LM (keel.reward.judge). Names are unique keys: a judge
source or keel cai can use a subset of the principles by name. `load_constitution` raises
ConstitutionError naming the file and the principle's index and field
(`c.yaml: principles[1].question: required field missing`).

The prompts built from a principle are templates filled with `str.format`; `check_template`
refuses a placeholder a template does not offer (literal braces are written {{ and }}).
"""

from __future__ import annotations

import string
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConstitutionError(ValueError):
    """A constitution file that cannot be used; the message names the file and the field."""


class Principle(BaseModel):
    """One principle: what a critic is asked, how it revises, and what a judge is asked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Key of the principle (unique in the file).")
    critique: str = Field(min_length=1, description="The critique request: what to find wrong with a response.")
    revision: str = Field(min_length=1, description="The revision request: how to rewrite the response.")
    question: str = Field(min_length=1, description="The judge's yes/no question about a response.")

    @field_validator("name", "critique", "revision", "question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    principles: list[Principle] = Field(min_length=1, description="The principles, in order.")

    def select(self, names: list[str] | None, field: str) -> list[Principle]:
        """The principles named (in the order given), or all of them; ConstitutionError naming
        `field` for a name the constitution does not have."""
        if names is None:
            return list(self.principles)
        by_name = {p.name: p for p in self.principles}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConstitutionError(f"{field}: no principle named {missing[0]!r} (the file has {sorted(by_name)})")
        return [by_name[n] for n in names]


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution file; ConstitutionError names the file, principle and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConstitutionError(f"{path}: cannot read file: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConstitutionError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConstitutionError(f"{path}: expected a mapping with a list of principles (principles: [...])")
    try:
        constitution = Constitution.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"]).lstrip(".")
        kind = {"missing": "required field missing", "extra_forbidden": "unknown key"}.get(e["type"], e["msg"])
        raise ConstitutionError(f"{path}: {where or '(top level)'}: {kind.removeprefix('Value error, ')}") from None
    seen: dict[str, int] = {}
    for i, p in enumerate(constitution.principles):
        if p.name in seen:
            raise ConstitutionError(
                f"{path}: principles[{i}].name: {p.name!r} is the name of principles[{seen[p.name]}]"
            )
        seen[p.name] = i
    return constitution


def template_fields(template: str) -> set[str]:
    """The placeholders of a str.format template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, allowed: tuple[str, ...]) -> str:
    """`template`, when it parses and uses only `allowed` placeholders; else ValueError saying which."""
    try:
        used = template_fields(template)
    except ValueError as err:
        raise ValueError(f"not a valid template ({err}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(used - set(allowed))
    if unknown:
        offered = ", ".join("{" + a + "}" for a in allowed)
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}: a template can use {offered}")
    return template
