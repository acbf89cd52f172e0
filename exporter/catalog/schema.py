"""Arrow schemas of the catalog's tables and of an archive's ``deltas`` table.

The catalog's tensor and checkpoint tables are the archive's (:mod:`exporter.archive.schema`)
with the run columns in front, so a member's index is accepted only when its columns are
exactly the archive schema's. ``schemas/`` holds the same definitions as JSON
(``python -m exporter.catalog.schema schemas``); the tests check written tables against them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from exporter.archive.schema import CHECKPOINT_SCHEMA, FORMAT_VERSION, TENSOR_SCHEMA, schema_to_json

CATALOG_FORMAT_VERSION = 1

#: What names a run, first in every catalog table.
RUN_FIELDS = [
    pa.field("run", pa.string(), nullable=False),
    pa.field("model_size", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("variant", pa.string(), nullable=False),
    pa.field("archive", pa.string(), nullable=False),
    pa.field("revision", pa.string()),
]
RUN_COLUMNS = tuple(f.name for f in RUN_FIELDS)


def _metadata(table: str) -> dict[str, str]:
    return {"neox_exporter.table": table, "neox_exporter.format_version": str(FORMAT_VERSION),
            "neox_exporter.catalog_format_version": str(CATALOG_FORMAT_VERSION)}


RUNS_SCHEMA = pa.schema(
    [
        *RUN_FIELDS,
        pa.field("source", pa.string(), nullable=False),
        pa.field("requested_revision", pa.string()),
        pa.field("steps", pa.int64(), nullable=False),
        pa.field("first_step", pa.int64()),
        pa.field("last_step", pa.int64()),
        pa.field("tensors", pa.int64(), nullable=False),
        pa.field("parameters", pa.int64()),
        pa.field("fingerprint", pa.string(), nullable=False),
    ],
    metadata=_metadata("catalog_runs"),
)

CATALOG_TENSOR_SCHEMA = pa.schema([*RUN_FIELDS, *TENSOR_SCHEMA], metadata=_metadata("catalog_tensors"))
CATALOG_CHECKPOINT_SCHEMA = pa.schema([*RUN_FIELDS, *CHECKPOINT_SCHEMA],
                                      metadata=_metadata("catalog_checkpoints"))

COMPARE_SCHEMA = pa.schema(
    [
        pa.field("run_a", pa.string(), nullable=False),
        pa.field("run_b", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("layer", pa.int32()),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("l2_a", pa.float64(), nullable=False),
        pa.field("l2_b", pa.float64(), nullable=False),
        pa.field("l2_distance", pa.float64(), nullable=False),
        pa.field("relative_l2", pa.float64()),
        pa.field("cosine", pa.float64()),
    ],
    metadata=_metadata("catalog_compare"),
)

DELTA_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("previous_step", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("layer", pa.int32()),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("update_l2", pa.float64(), nullable=False),
        pa.field("weight_l2", pa.float64(), nullable=False),
        pa.field("ratio", pa.float64()),
    ],
    metadata={"neox_exporter.table": "deltas", "neox_exporter.format_version": str(FORMAT_VERSION)},
)

#: file name in schemas/ -> schema
SCHEMA_FILES = {
    "catalog_runs.schema.json": RUNS_SCHEMA,
    "catalog_tensors.schema.json": CATALOG_TENSOR_SCHEMA,
    "catalog_checkpoints.schema.json": CATALOG_CHECKPOINT_SCHEMA,
    "catalog_compare.schema.json": COMPARE_SCHEMA,
    "deltas.schema.json": DELTA_SCHEMA,
}


def schema_differences(found: pa.Schema, expected: pa.Schema) -> list[str]:
    """What keeps a table of schema ``found`` from being read as ``expected`` (names and types;
    nullability and metadata aside), one phrase per difference; empty when they agree."""
    have = {f.name: f.type for f in found}
    want = {f.name: f.type for f in expected}
    out = [f"no column {name!r}" for name in want if name not in have]
    out += [f"column {name!r} is {have[name]}, expected {want[name]}"
            for name in want if name in have and not have[name].equals(want[name])]
    out += [f"unexpected column {name!r}" for name in have if name not in want]
    return out


def with_run_columns(table: pa.Table, run: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """``table`` (archive columns) with the run columns of ``run`` in front, as ``schema``."""
    n = table.num_rows
    columns = [pa.repeat(pa.scalar(run.get(f.name), f.type), n) for f in RUN_FIELDS]
    columns += [table[name] for name in schema.names[len(RUN_FIELDS):]]
    return pa.Table.from_arrays(columns, schema=schema)


def without_run_columns(table: pa.Table) -> pa.Table:
    """The archive columns of a catalog table."""
    return table.drop_columns(list(RUN_COLUMNS))


def write_schemas(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, schema in SCHEMA_FILES.items():
        (folder / name).write_text(json.dumps(schema_to_json(schema), indent=2) + "\n",
                                   encoding="utf-8")


if __name__ == "__main__":
    write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas"))
