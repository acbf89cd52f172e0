"""Editing the files of a built archive by hand, the way a hostile publisher would.

Each helper rewrites one file of the archive layout (DESIGN.md "Archive layout") in place and
keeps everything else consistent, so that a case breaks exactly one rule:

- safetensors files: an 8-byte little-endian header length, the JSON header, the data
  (safetensors ``README.md`` "Format");
- ``.safetensors.zst`` files: magic, frames, JSON index, its u64 length, magic
  (exporter/convert/compress.py);
- index shards: Parquet tables with the schemas of exporter/archive/schema.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from exporter.archive.schema import CHECKPOINT_SCHEMA, TENSOR_SCHEMA
from exporter.convert.compress import MAGIC, compress_safetensors

Rows = list[dict[str, Any]]


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """The parsed header (``__metadata__`` included) and the data section."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes) -> int:
    """Write a safetensors file from a header (a dict, or raw bytes written as they are)
    and a data section; returns where the data starts."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if not isinstance(header, bytes):
        raw += b" " * (-(8 + len(raw)) % 8)  # data 8-byte aligned, as safetensors pads it
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return 8 + len(raw)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> int:
    """Apply ``edit`` to the header of a safetensors file; the data stays. Returns the new
    start of the data."""
    header, data = read_safetensors(path)
    edit(header)
    return write_safetensors(path, header, data)


def shard_path(root: Path, table: str, step: int) -> Path:
    return root / "index" / table / f"step{step}.parquet"


def edit_rows(root: Path, step: int, edit: Callable[[Rows], Rows | None],
              table: str = "tensors", schema: pa.Schema | None = None) -> None:
    """Rewrite the rows of an index shard (``schema``: write it with another schema)."""
    path = shard_path(root, table, step)
    rows = pq.read_table(path).to_pylist()
    rows = edit(rows) or rows
    default = TENSOR_SCHEMA if table == "tensors" else CHECKPOINT_SCHEMA
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or default), path)


def edit_table(root: Path, step: int, edit: Callable[[pa.Table], pa.Table],
               table: str = "tensors") -> None:
    """Rewrite an index shard as an Arrow table (for columns the schema would refuse)."""
    path = shard_path(root, table, step)
    pq.write_table(edit(pq.read_table(path)), path)


def edit_row(root: Path, step: int, tensor: str, **values: Any) -> None:
    """Set columns of the model row of ``tensor`` in a step's tensor shard."""
    def edit(rows: Rows) -> None:
        row = next(r for r in rows if r["name"] == tensor and r["kind"] == "model")
        row.update(values)
    edit_rows(root, step, edit)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_output(root: Path, step: int, relative: str) -> None:
    """Make the checkpoint index list ``relative`` (a file of the archive) with its sha256."""
    def edit(rows: Rows) -> None:
        files = [f for f in rows[0]["output_files"] if not relative.startswith(f["path"])]
        path = root / relative
        files.append({"path": relative, "sha256": sha256_of(path), "bytes": path.stat().st_size})
        rows[0]["output_files"] = sorted(files, key=lambda f: f["path"])
    edit_rows(root, step, edit, table="checkpoints")


def compress_model(root: Path, step: int) -> Path:
    """Replace a step's model.safetensors with its ``.safetensors.zst`` (``--compress``)."""
    plain = root / "steps" / f"step{step}" / "model.safetensors"
    packed = plain.with_name("model.safetensors.zst")
    compress_safetensors(plain, packed)
    plain.unlink()
    relative = packed.relative_to(root).as_posix()

    def point(rows: Rows) -> None:
        for row in rows:
            if row["file"].endswith("/model.safetensors"):
                row["file"] = relative
    edit_rows(root, step, point)
    record_output(root, step, relative)
    return packed


def read_zst_index(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The frames part (magic included) and the parsed JSON index of a compressed file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[-16:-8])
    return raw[:-16 - length], json.loads(raw[-16 - length:-16])


def edit_zst_index(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the JSON index of a compressed file; the frames stay."""
    frames, index = read_zst_index(path)
    edit(index)
    encoded = json.dumps(index).encode()
    path.write_bytes(frames + encoded + struct.pack("<Q", len(encoded)) + MAGIC)


def nested_json(depth: int) -> bytes:
    """A JSON object holding ``depth`` nested lists: valid JSON that recursion cannot parse."""
    return b'{"x":' + b"[" * depth + b"]" * depth + b"}"
