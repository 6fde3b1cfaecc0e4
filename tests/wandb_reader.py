"""Read an offline W&B run file (``run-*.wandb``) back: history keys and values, summary, config, metrics.

The file is a LevelDB-style log (a 7-byte ':W&B' header, then 32 KiB blocks of records with a 7-byte header:
crc32c, length, type FULL/FIRST/MIDDLE/LAST) of ``wandb_internal_pb2.Record`` protobufs. wandb >= 0.20 no longer
ships a Python reader, so the tests carry this one.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            buf = chunk
        elif kind == FIRST:
            buf = chunk
            continue
        elif kind == MIDDLE:
            buf += chunk
            continue
        elif kind == LAST:
            buf += chunk
        rec = pb.Record()
        rec.ParseFromString(buf)
        yield rec


@dataclass
class Run:
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def read_run(path: str | Path) -> Run:
    run = Run()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run.history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                run.summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "config":
            for i in rec.config.update:
                run.config[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "metric":
            m = rec.metric
            run.metrics[m.name or m.glob_name] = {"step_metric": m.step_metric, "summary": str(m.summary)}
    return run
