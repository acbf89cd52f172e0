"""The Parquet index: one row per tensor and one row per step, one shard per step."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from exporter.archive.schema import CHECKPOINT_SCHEMA, TENSOR_SCHEMA
from exporter.archive.trust import resolve_inside
from exporter.archive.validate import read_shard
from exporter.files import write_bytes_atomic
from exporter.records import WrittenRecord, dtype_name


def tensor_rows(step: int, records: Sequence[WrittenRecord], prefix: str) -> list[dict[str, Any]]:
    """Index rows for the tensors of one step; ``prefix`` is the step folder, relative to the root."""
    rows = []
    for r in records:
        stats = r.stats.as_dict()
        rows.append(
            {
                "step": step,
                "kind": r.job.kind,
                "name": r.job.name,
                "neox_name": r.job.neox_name,
                "layer": r.job.layer,
                "dtype": dtype_name(r.dtype),
                "source_dtype": dtype_name(r.job.dtype),
                "shape": list(r.job.shape),
                "numel": r.job.numel,
                "file": f"{prefix}/{r.file}",
                "data_offset_begin": r.begin,
                "data_offset_end": r.end,
                "digest": r.digest,
                "digest_algorithm": r.digest_algorithm,
                **stats,
            }
        )
    return rows


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(path: Path, tbl: pa.Table) -> None:
    """Write a Parquet shard under a temporary name, then rename it into place."""
    sink = io.BytesIO()
    pq.write_table(tbl, sink, compression="zstd")
    write_bytes_atomic(path, sink.getvalue())


def write_tensor_index(path: Path, rows: list[dict[str, Any]]) -> None:
    write_table(path, table(rows, TENSOR_SCHEMA))


def write_checkpoint_index(path: Path, row: dict[str, Any]) -> None:
    write_table(path, table([row], CHECKPOINT_SCHEMA))


def read_index(folder: Path) -> pa.Table:
    """All shards of an index folder as one table (sorted by step), each validated
    (:func:`exporter.archive.validate.read_shard`)."""
    paths = sorted(folder.glob("step*.parquet"), key=lambda p: (len(p.name), p.name))
    if not paths:
        schema = TENSOR_SCHEMA if folder.name == "tensors" else CHECKPOINT_SCHEMA
        return schema.empty_table()
    root = folder.parent.parent
    return pa.concat_tables([
        read_shard(resolve_inside(root, p.relative_to(root).as_posix(), str(root)), str(p))
        for p in paths])
