"""Reading back what the tracker sinks wrote, with the trackers' own readers where they have one."""

from __future__ import annotations

import struct
from pathlib import Path


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file in `log_dir`, read by TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (run-<id>.wandb), as wandb's protobuf `Record`s.

    W&B has no Python reader of its own any more (wandb-core, in Go, writes and syncs the file). The
    file is a 7-byte header (":W&B", magic, version) and then LevelDB's log format: 32 KiB blocks of
    chunks, each with a 7-byte header (CRC-32, little-endian length, type: 1 full, 2 first, 3 middle,
    4 last); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file: Path) -> list[tuple[int, dict[str, float]]]:
    """[(step, {metric: value})] of the history rows of a W&B run file (W&B's own `_` keys left out)."""
    import json

    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
            rows.append((record.history.step.num, {k: v for k, v in values.items() if not k.startswith("_")}))
    return rows


def wandb_run(run_file: Path):
    """The `RunRecord` of a W&B run file (project, entity, display name, config)."""
    return next(r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run")
