"""Rows from JSONL and HF datasets: every error names the file and the row; splits are seeded."""

from __future__ import annotations

import json

import pytest

from keel.data.rows import DataError, read_rows, split_rows

ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]


def test_jsonl_rows_know_their_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + json.dumps(ROWS[2]) + "\n")
    rows = read_rows(str(path))
    assert [r.fields["prompt"] for r in rows] == ["0+1=", "1+1=", "2+1="]
    assert rows[2].where == f"{path}:4"  # the blank line is skipped but counted


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_malformed_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: {message}"):
        read_rows(str(path))


def test_invalid_utf8_is_named_by_its_line(tmp_path):
    """The bad line itself, also far past the first chunk a text-mode read decodes at once."""
    good = (json.dumps(ROWS[0]) + "\n").encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good * 999 + b'{"prompt": "caf\xe9"}\n' + good)  # Latin-1 \xe9, not UTF-8
    with pytest.raises(DataError, match=rf"^{path}:1000: not valid UTF-8 \(.*byte 0xe9 at column 16\)$"):
        read_rows(str(path))
    path.write_bytes(good + '{"prompt": "café"}\n'.encode() + b'{"prompt": "\xc3"}')  # cut in a character
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        read_rows(str(path))


def test_field_readers_name_the_row_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "", "n": 3, "flag": True, "x": 1.5}) + "\n")
    [row] = read_rows(str(path))
    with pytest.raises(DataError, match=rf"{path}:1: missing field 'response'"):
        row.text("response")
    with pytest.raises(DataError, match=rf"{path}:1: field 'prompt' is empty"):
        row.text("prompt")
    assert row.text("prompt", allow_empty=True) == ""
    with pytest.raises(DataError, match=rf"{path}:1: field 'n' must be a string, got int"):
        row.text("n")
    with pytest.raises(DataError, match="field 'flag' must be a number"):
        row.number("flag")
    assert row.number("x") == 1.5


def test_hf_datasets_from_disk_and_from_local_files(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_json(str(tmp_path / "d.json"))
    for source in ("saved", "dict", "d.parquet", "d.json"):
        rows = read_rows(str(tmp_path / source), "hf")
        assert [r.fields["prompt"] for r in rows] == [r["prompt"] for r in ROWS], source
        assert rows[3].where == f"{tmp_path / source}[3]"
    with pytest.raises(DataError, match="not a dataset directory or a data file"):
        read_rows(str(tmp_path / "d.txt"), "hf")
    with pytest.raises(DataError, match="does not exist"):
        read_rows(str(tmp_path / "missing.parquet"), "hf")


def test_split_is_seeded_disjoint_and_complete():
    rows = list(range(100))
    train, held = split_rows(rows, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == rows and not set(train) & set(held)
    assert split_rows(rows, 0.1, seed=3) == (train, held)
    assert split_rows(rows, 0.1, seed=4)[1] != held
    assert split_rows(rows, 0.0, seed=3) == (rows, [])
    assert len(split_rows(rows[:5], 0.01, seed=0)[1]) == 1  # at least one held out
