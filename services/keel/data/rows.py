"""Dataset rows from JSONL files and HF datasets, each carrying where it came from.

Every error names the file and the row: `prompts.jsonl:17: ...` for a JSONL line,
`pairs.parquet[16]: ...` for row 16 of an HF dataset. The field readers here are the same
for prompts, SFT examples and preference pairs.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Local data files HF `datasets` reads with a builder named after the suffix.
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """A bad data file or row; the message names the file and the row."""


@dataclass(frozen=True)
class Row:
    where: str  # "file:line" or "dir[index]", for error messages
    fields: dict[str, Any]

    def text(self, name: str, allow_empty: bool = False) -> str:
        """A string field; a missing, non-string or (unless allowed) blank one is a DataError."""
        if name not in self.fields:
            raise DataError(f"{self.where}: missing field {name!r}")
        value = self.fields[name]
        if not isinstance(value, str):
            raise DataError(f"{self.where}: field {name!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise DataError(f"{self.where}: field {name!r} is empty")
        return value

    def number(self, name: str) -> float:
        """A finite number field; JSON's NaN and Infinity (which `json` reads) are DataErrors."""
        value = self.fields.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(f"{self.where}: field {name!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise DataError(f"{self.where}: field {name!r} must be a finite number, got {value!r}")
        return float(value)


def read_rows(path: str, format: str = "jsonl") -> list[Row]:
    """Every row of a JSONL file, or (format "hf") of a `save_to_disk` directory or a local data file."""
    if format == "hf":
        return _read_hf(path)
    rows = []
    try:
        with open(path, "rb") as f:  # bytes: a bad byte is named by its line, not by the chunk it was read in
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad = f"{err.reason}: byte {raw[err.start]:#04x} at column {err.start + 1}"  # columns in bytes
                    raise DataError(f"{where}: not valid UTF-8 ({bad})") from None
                if not line.strip():
                    continue
                try:
                    fields = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(fields, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(fields).__name__}")
                rows.append(Row(where, fields))
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    return rows


def _read_hf(path: str) -> list[Row]:
    import datasets

    p = Path(path)
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: a DatasetDict without a 'train' split (has {sorted(ds)})")
                ds = ds["train"]
        elif p.suffix in HF_BUILDERS:
            ds = datasets.load_dataset(HF_BUILDERS[p.suffix], data_files=str(p), split="train")
        else:
            known = ", ".join(sorted(HF_BUILDERS))
            raise DataError(f"{path}: not a dataset directory or a data file ({known})")
    except FileNotFoundError:
        raise DataError(f"{path}: does not exist") from None
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot read as an HF dataset ({err})") from None
    return [Row(f"{path}[{i}]", dict(r)) for i, r in enumerate(ds)]


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random eval_fraction of the rows held out (at least one when > 0)."""
    if eval_fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
