"""Hostile archives, ``schema`` and ``text`` families: index shards, manifest and JSON against
the schemas, and names made to be rendered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa

from exporter.archive.schema import TENSOR_SCHEMA
from security.archive_files import (
    edit_header,
    edit_row,
    edit_rows,
    edit_table,
    nested_json,
    read_safetensors,
    shard_path,
)
from security.hostile_archives import (
    DENSE,
    HOSTILE_NAME,
    HOSTILE_TEXT,
    MODEL,
    STEP,
    STEPS,
    case,
)

# -- index shards, manifest and JSON against the schemas ---------------------------------------


@case("schema", r"tensors/step8\.parquet: no column 'digest'")
def index_lacks_a_column(root: Path, outside: Path) -> None:
    edit_table(root, STEP, lambda t: t.drop_columns(["digest"]))


@case("schema", "column 'shape' is string, the schema says list<item: int64>")
def index_column_has_another_type(root: Path, outside: Path) -> None:
    edit_table(root, STEP, lambda t: t.set_column(
        t.schema.get_field_index("shape"), "shape", pa.array([str(s) for s in t["shape"].to_pylist()])))


@case("schema", r"tensors/step8\.parquet row \d+: file is null")
def index_file_is_null(root: Path, outside: Path) -> None:
    schema = TENSOR_SCHEMA.set(TENSOR_SCHEMA.get_field_index("file"),
                               TENSOR_SCHEMA.field("file").with_nullable(True))
    edit_rows(root, STEP, lambda rows: [{**r, "file": None} if r["name"] == DENSE else r
                                        for r in rows], schema=schema)


@case("schema", r"row \d+: numel out of range")
def index_numel_is_negative(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, numel=-1)


@case("schema", r"row \d+: unknown kind \(\{'kind': 'evil'\}\)")
def index_kind_is_unknown(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, kind="evil")


@case("schema", r"row 0: step is not 8, the step of the shard")
def index_row_of_another_step(root: Path, outside: Path) -> None:
    edit_rows(root, STEP, lambda rows: [{**rows[0], "step": 9}, *rows[1:]])


@case("schema", r"shape \[2, 2\] does not hold numel 1024")
def index_shape_disagrees_with_numel(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, shape=[2, 2])


@case("schema", "digest is not 64 hex digits")
def index_sha256_is_markup(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, digest="<script>alert(1)</script>")


@case("schema", "unreadable Parquet")
def index_shard_is_not_parquet(root: Path, outside: Path) -> None:
    shard_path(root, "tensors", STEP).write_bytes(b"PAR1" + bytes(100) + b"PAR1")


@case("schema", None)  # read as no step's shard: the loader reads only the manifest's shards
def index_holds_a_stray_table(root: Path, outside: Path) -> None:
    shutil.copy(shard_path(root, "tensors", STEP), root / "index" / "tensors" / "notes.parquet")


@case("schema", r"checkpoints/step8\.parquet: 2 rows, one expected")
def checkpoint_shard_has_two_rows(root: Path, outside: Path) -> None:
    edit_rows(root, STEP, lambda rows: rows * 2, table="checkpoints")


@case("schema", "manifest.json: expected object, found array")
def manifest_is_a_list(root: Path, outside: Path) -> None:
    (root / "manifest.json").write_text("[]")


@case("schema", r"manifest.json.steps: unexpected key 'eight'")
def manifest_step_is_not_a_number(root: Path, outside: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["steps"]["eight"] = manifest["steps"].pop(str(STEP))
    (root / "manifest.json").write_text(json.dumps(manifest))


@case("schema", r"manifest.json.format_version: must be 1")
def manifest_of_another_format(root: Path, outside: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))


@case("schema", "manifest.json: not valid JSON: nested too deeply")
def manifest_nested_too_deeply(root: Path, outside: Path) -> None:
    (root / "manifest.json").write_bytes(nested_json(100_000))


@case("schema", "state.json: not valid JSON: nested too deeply")
def state_json_nested_too_deeply(root: Path, outside: Path) -> None:
    (root / "steps" / f"step{STEP}" / "state.json").write_bytes(nested_json(100_000))


# -- text shown to people ------------------------------------------------------------------------


@case("text", None)
def tensor_name_is_markup_and_escapes(root: Path, outside: Path) -> None:
    """The dense weight renamed (file and index agree), out of any layer, with a wrong digest
    so that ``verify`` names it."""
    start = edit_header(root / MODEL, lambda h: h.update({HOSTILE_NAME: h.pop(DENSE)}))
    header = read_safetensors(root / MODEL)[0]

    def edit(rows: list[dict]) -> None:
        for row in rows:
            if row["file"] == MODEL:
                name = HOSTILE_NAME if row["name"] == DENSE else row["name"]
                begin, end = header[name]["data_offsets"]
                row.update(name=name, data_offset_begin=start + begin, data_offset_end=start + end)
            if row["name"] == HOSTILE_NAME:
                row.update(layer=None, digest="0" * 64)
    edit_rows(root, STEP, edit)


@case("text", None)
def run_text_is_markup_and_escapes(root: Path, outside: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["source"] = f"hf://x/y) {HOSTILE_TEXT}"
    manifest["tool"]["version"] = HOSTILE_TEXT
    (root / "manifest.json").write_text(json.dumps(manifest))
    for step in STEPS:
        edit_rows(root, step, lambda rows: [{**r, "source_revision": f"a`{HOSTILE_TEXT}|\n# h",
                                             "format": HOSTILE_TEXT, "model_dtype": HOSTILE_TEXT}
                                            for r in rows], table="checkpoints")
