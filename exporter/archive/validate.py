"""Index shards and the manifest, validated against the committed schemas when opened.

``schemas/`` holds the contract (``exporter/archive/schema.py`` writes it): the Arrow schemas
of ``index/tensors`` and ``index/checkpoints`` and the manifest's JSON schema. An archive
someone else built is checked against them before any of its rows is used, so a bad row is
an :class:`~exporter.errors.ArchiveError` naming the file and the row, never a crash deep in
a read. On top of the column types, rows must make sense: one step per shard, known kinds
and dtypes, non-negative shapes whose product is ``numel``, byte ranges of ``numel x
itemsize`` bytes, sha256 digests in hex, and every path inside the archive
(:func:`exporter.archive.trust.check_relative`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exporter.archive.header import INDEX_DTYPES, ITEMSIZE, shape_of
from exporter.archive.schema import (
    ADDED_COLUMNS,
    CHECKPOINT_SCHEMA,
    MANIFEST_SCHEMA,
    TENSOR_SCHEMA,
)
from exporter.archive.trust import check_relative
from exporter.convert.digest import ALGORITHMS
from exporter.errors import ArchiveError
from exporter.records import KINDS

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD = re.compile(r"index/(?P<table>tensors|checkpoints)/step(?P<step>[0-9]{1,18})\.parquet$")
#: bounds on one index shard (a Pythia-410M step has about 2,000 tensor rows, 1 MB)
MAX_SHARD_ROWS = 10_000_000
MAX_SHARD_BYTES = 1 << 30
#: a numel above this times an 8-byte element would overflow int64
_MAX_NUMEL = 2**60


def _conform(table: pa.Table, schema: pa.Schema, label: str) -> pa.Table:
    """The table's columns in schema order, refused if one is missing, mistyped or null where
    the schema forbids it. A column added to the format later (:data:`ADDED_COLUMNS`, all
    nullable) that the shard lacks reads as nulls, so older archives stay readable."""
    columns = []
    for field in schema:
        if field.name not in table.column_names and field.name in ADDED_COLUMNS:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        if field.name not in table.column_names:
            raise ArchiveError(f"{label}: no column {field.name!r}")
        column = table.column(field.name)
        if not column.type.equals(field.type):
            raise ArchiveError(f"{label}: column {field.name!r} is {column.type}, the schema says "
                               f"{field.type}")
        if not field.nullable and column.null_count:
            row = _first(pc.is_null(column))
            raise ArchiveError(f"{label} row {row}: {field.name} is null")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _first(mask: Any) -> int:
    """Index of the first true value of a boolean array (nulls count as true)."""
    filled = pc.fill_null(mask, True)
    return int(pc.index(filled, True).as_py())


def _refuse_where(mask: Any, label: str, what: str, values: pa.Table | None = None) -> None:
    if pc.any(pc.fill_null(mask, True)).as_py():
        row = _first(mask)
        shown = f" ({values.slice(row, 1).to_pylist()[0]})" if values is not None else ""
        raise ArchiveError(f"{label} row {row}: {what}{shown}")


def _check_step(table: pa.Table, step: int | None, label: str) -> None:
    if step is not None:
        _refuse_where(pc.not_equal(table["step"], step), label,
                      f"step is not {step}, the step of the shard", table.select(["step"]))


def validate_tensor_shard(table: pa.Table, label: str, step: int | None = None) -> pa.Table:
    """Check one ``index/tensors`` shard (``step``: the step its name says) and return it with
    exactly the schema's columns.

    Raises:
        ArchiveError: naming ``label`` and the row.
    """
    if "digest" not in table.column_names and "sha256" in table.column_names:
        # Written before the digest column: its sha256s are the digests.
        table = table.append_column("digest", table["sha256"]).append_column(
            "digest_algorithm", pa.array(["sha256"] * table.num_rows, pa.string()))
    table = _conform(table, TENSOR_SCHEMA, label)
    _check_step(table, step, label)
    _refuse_where(pc.invert(pc.is_in(table["kind"], pa.array(KINDS))), label, "unknown kind",
                  table.select(["kind"]))
    dtypes = pa.array(list(INDEX_DTYPES))
    position = pc.index_in(table["dtype"], dtypes)
    _refuse_where(pc.is_null(position), label, "unknown dtype", table.select(["name", "dtype"]))
    numel, begin, end = table["numel"], table["data_offset_begin"], table["data_offset_end"]
    _refuse_where(pc.or_(pc.less(numel, 0), pc.greater(numel, _MAX_NUMEL)), label,
                  "numel out of range", table.select(["name", "numel"]))
    _refuse_where(pc.or_(pc.less(begin, 0), pc.less(end, begin)), label,
                  "data offsets are not 0 <= begin <= end", table.select(
                      ["name", "data_offset_begin", "data_offset_end"]))
    itemsize = pc.take(pa.array([ITEMSIZE[n] for n in INDEX_DTYPES.values()], pa.int64()), position)
    _refuse_where(pc.not_equal(pc.subtract(end, begin), pc.multiply(numel, itemsize)), label,
                  "data offsets do not span numel x itemsize bytes",
                  table.select(["name", "dtype", "numel", "data_offset_begin", "data_offset_end"]))
    _refuse_where(pc.invert(pc.match_substring_regex(table["digest"], _SHA256.pattern)), label,
                  "digest is not 64 hex digits", table.select(["name", "digest"]))
    _refuse_where(pc.invert(pc.is_in(table["digest_algorithm"], pa.array(list(ALGORITHMS)))),
                  label, "unknown digest algorithm", table.select(["name", "digest_algorithm"]))
    for row, (name, shape, count) in enumerate(zip(table["name"].to_pylist(),
                                                   table["shape"].to_pylist(),
                                                   numel.to_pylist(), strict=True)):
        if math.prod(shape_of(shape, f"{label} row {row}", name)) != count:
            raise ArchiveError(f"{label} row {row}: tensor {name!r}: shape {shape} does not hold "
                               f"numel {count} elements")
    files = table["file"]
    for file in pc.unique(files).to_pylist():
        check_relative(file, f"{label} row {_first(pc.equal(files, file))}")
    return table


def validate_checkpoint_shard(table: pa.Table, label: str, step: int | None = None) -> pa.Table:
    """Check one ``index/checkpoints`` shard: one row, its step, its file lists (paths inside
    the archive, hex sha256s, non-negative sizes)."""
    table = _conform(table, CHECKPOINT_SCHEMA, label)
    if step is not None and table.num_rows != 1:
        raise ArchiveError(f"{label}: {table.num_rows} rows, one expected")
    _check_step(table, step, label)
    for row, (outputs, sources) in enumerate(zip(table["output_files"].to_pylist(),
                                                 table["source_files"].to_pylist(), strict=True)):
        for column, entries in (("output_files", outputs), ("source_files", sources)):
            for i, entry in enumerate(entries):
                where = f"{label} row {row}: {column}[{i}]"
                if column == "output_files":
                    check_relative(entry["path"], where)
                if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
                    raise ArchiveError(f"{where}: sha256 is not 64 hex digits")
                if not isinstance(entry["bytes"], int) or entry["bytes"] < 0:
                    raise ArchiveError(f"{where}: bytes {entry['bytes']!r} is not a size")
    return table


def read_shard(path: str | os.PathLike[str], label: str) -> pa.Table:
    """Read and validate an index shard ``index/{tensors,checkpoints}/step{N}.parquet``.

    Its uncompressed size, as the Parquet footer declares it, is bounded before any page is
    decompressed (a small file can declare gigabytes); any Arrow or I/O failure is an
    :class:`ArchiveError` naming ``label``.
    """
    match = _SHARD.search(label)
    if match is None:
        raise ArchiveError(f"{label}: not an index shard (index/tensors/step{{N}}.parquet or "
                           "index/checkpoints/step{N}.parquet)")
    try:
        with pq.ParquetFile(path) as parquet:
            meta = parquet.metadata
            declared = sum(meta.row_group(g).column(c).total_uncompressed_size
                           for g in range(meta.num_row_groups) for c in range(meta.num_columns))
            if declared > MAX_SHARD_BYTES or meta.num_rows > MAX_SHARD_ROWS:
                raise ArchiveError(f"{label}: {meta.num_rows} rows, {declared} bytes uncompressed "
                                   f"(at most {MAX_SHARD_ROWS} rows, {MAX_SHARD_BYTES} bytes)")
            table = parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise ArchiveError(f"{label}: unreadable Parquet: {' '.join(str(exc).split())}") from exc
    validate = validate_tensor_shard if match["table"] == "tensors" else validate_checkpoint_shard
    return validate(table, label, int(match["step"]))


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
    "number": (int, float), "boolean": (bool,), "null": (type(None),),
}
_KEYWORDS = {"$schema", "title", "type", "required", "properties", "patternProperties",
             "additionalProperties", "const", "enum", "pattern", "minimum", "items"}


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _JSON_TYPES[name])


def check_json_schema(value: Any, schema: dict[str, Any], where: str) -> None:
    """Validate ``value`` against the subset of JSON Schema (draft 2020-12) that
    :data:`~exporter.archive.schema.MANIFEST_SCHEMA` uses; a keyword outside it is a bug here,
    never silently ignored."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise NotImplementedError(f"JSON schema keywords {sorted(unknown)}")
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in names):
            raise ArchiveError(f"{where}: expected {' or '.join(names)}, found {_kind(value)}")
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        raise ArchiveError(f"{where}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ArchiveError(f"{where}: must be one of {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        raise ArchiveError(f"{where}: does not match {schema['pattern']}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        raise ArchiveError(f"{where}: below {schema['minimum']}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check_json_schema(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ArchiveError(f"{where}: no {key!r}")
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None:
                sub = next((s for p, s in schema.get("patternProperties", {}).items()
                            if re.search(p, key)), None)
            if sub is None and schema.get("additionalProperties", True) is False:
                raise ArchiveError(f"{where}: unexpected key {key!r}")
            if sub is not None:
                check_json_schema(item, sub, f"{where}.{key}")


def _kind(value: Any) -> str:
    return next((t for t in _JSON_TYPES if _is_type(value, t)), type(value).__name__)


def validate_manifest(data: Any, label: str,
                      only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``manifest.json`` checked against the manifest schema (``schemas/manifest.schema.json``).

    ``only`` restricts the check to some top-level keys, for a reader that uses no others
    (``push`` reads ``steps``).

    Example:
        >>> validate_manifest({"format_version": 1}, "manifest.json")
        Traceback (most recent call last):
        ...
        exporter.errors.ArchiveError: manifest.json: no 'tool'
    """
    schema = MANIFEST_SCHEMA
    if only is not None:
        schema = {"type": "object", "required": [k for k in schema["required"] if k in only],
                  "properties": {k: schema["properties"][k] for k in only}}
    check_json_schema(data, schema, label)
    return data
