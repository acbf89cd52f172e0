"""Arrow schemas of the Parquet index, and the manifest's JSON schema.

These are the contract between ``build``, ``push`` and the loader. ``schemas/`` at the
repository root holds the same definitions as JSON (``python -m exporter.archive.schema
schemas``) and the tests check every written table against them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1

#: Nullable columns added to the index after archives of this format version were first
#: written: a shard without one reads it as nulls (``digest``/``digest_algorithm`` replace an
#: older ``sha256`` column: exporter.archive.validate reads that one as the digest).
ADDED_COLUMNS = frozenset({"learning_rate_source"})

TENSOR_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("neox_name", pa.string()),
        pa.field("layer", pa.int32()),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("source_dtype", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("data_offset_begin", pa.int64(), nullable=False),
        pa.field("data_offset_end", pa.int64(), nullable=False),
        # Digest of the tensor's bytes; archives written before this column hold "sha256".
        pa.field("digest", pa.string(), nullable=False),
        pa.field("digest_algorithm", pa.string(), nullable=False),
        pa.field("min", pa.float64()),
        pa.field("max", pa.float64()),
        pa.field("mean", pa.float64()),
        pa.field("std", pa.float64()),
        pa.field("l2", pa.float64()),
        pa.field("absmax", pa.float64()),
        pa.field("nan_count", pa.int64()),  # null: exported with --no-stats
        pa.field("inf_count", pa.int64()),
        pa.field("zero_count", pa.int64()),
    ],
    metadata={"neox_exporter.table": "tensors", "neox_exporter.format_version": str(FORMAT_VERSION)},
)

FILE_ENTRY = pa.struct(
    [pa.field("path", pa.string()), pa.field("sha256", pa.string()), pa.field("bytes", pa.int64())]
)

CHECKPOINT_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("iteration", pa.int64()),
        pa.field("samples", pa.int64()),
        pa.field("skipped_steps", pa.int64()),
        pa.field("learning_rate", pa.float64()),
        pa.field("learning_rate_source", pa.string()),
        pa.field("loss_scale", pa.float64()),
        pa.field("adam_step", pa.int64()),
        pa.field("adam_step_source", pa.string()),
        pa.field("dp_size", pa.int32()),
        pa.field("tp_size", pa.int32()),
        pa.field("pp_size", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("model_dtype", pa.string()),
        pa.field("output_dtype", pa.string()),
        pa.field("include", pa.list_(pa.string()), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_revision", pa.string()),
        pa.field("source_files", pa.list_(FILE_ENTRY), nullable=False),
        pa.field("output_files", pa.list_(FILE_ENTRY), nullable=False),
        pa.field("tensors", pa.int64(), nullable=False),
        pa.field("bytes_in", pa.int64(), nullable=False),
        pa.field("bytes_out", pa.int64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("tool_version", pa.string(), nullable=False),
    ],
    metadata={"neox_exporter.table": "checkpoints", "neox_exporter.format_version": str(FORMAT_VERSION)},
)

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neox-exporter archive manifest",
    "type": "object",
    "required": ["format_version", "tool", "source", "options", "steps", "failed"],
    "properties": {
        "format_version": {"const": FORMAT_VERSION},
        "tool": {
            "type": "object",
            "required": ["name", "version"],
            "properties": {"name": {"const": "neox-exporter"}, "version": {"type": "string"}},
        },
        "source": {"type": "string"},
        "options": {
            "type": "object",
            "required": ["include", "dtype"],
            "properties": {
                "include": {"type": "array", "items": {"enum": ["model", "optimizer", "state"]}},
                "dtype": {"type": ["string", "null"]},
                "compress": {"type": ["string", "null"], "pattern": "^zstd:[0-9]+$"},
            },
        },
        "steps": {
            "type": "object",
            "patternProperties": {
                "^[0-9]+$": {
                    "type": "object",
                    "required": ["tensors", "bytes_out", "files"],
                    "properties": {
                        "tensors": {"type": "integer", "minimum": 0},
                        "bytes_out": {"type": "integer", "minimum": 0},
                        "files": {"type": "integer", "minimum": 0},
                        "source_revision": {"type": ["string", "null"]},
                    },
                }
            },
            "additionalProperties": False,
        },
        "failed": {
            "type": "object",
            "patternProperties": {
                "^[0-9]+$": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                }
            },
            "additionalProperties": False,
        },
        "updated": {"type": "string"},
    },
}


def schema_to_json(schema: pa.Schema) -> dict[str, Any]:
    """A readable JSON description of an Arrow schema (field name, type, nullability)."""
    return {
        "metadata": {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()},
        "fields": [
            {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema
        ],
    }


def write_schemas(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (
        ("tensors.schema.json", schema_to_json(TENSOR_SCHEMA)),
        ("checkpoints.schema.json", schema_to_json(CHECKPOINT_SCHEMA)),
        ("manifest.schema.json", MANIFEST_SCHEMA),
    ):
        (folder / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas"))
