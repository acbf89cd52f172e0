"""Hostile archives: each a benign archive with one rule of the read path broken by hand.

Each case edits a copy of a small built archive (``ARCHIVE``) and may plant files next to it
(``OUTSIDE``, a sibling folder): a safetensors file with the same header as the step's model
file whose data is :data:`MARKER` repeated, a step folder holding it, a manifest, a
``state.json`` and an index shard that all carry the marker. Outcome of each case:

- ``refused``: a regex that an :class:`~exporter.errors.ArchiveError` raised while reading the
  archive must match (``None``: the archive reads without error, as for the text cases whose
  names must only be *shown* safely);
- always: no byte of ``OUTSIDE`` comes back, and no other exception type escapes.

Families: ``path`` (content paths that leave the root), ``header`` (safetensors headers and
their agreement with the index), ``compressed`` (``.safetensors.zst`` indexes), ``schema``
(index shards, manifest, JSON), ``text`` (names that carry Markdown, HTML, terminal escapes).

The cases live in ``hostile_paths.py``, ``hostile_headers.py`` and ``hostile_tables.py``;
``security.archive_corpus.CASES`` holds them all (``cd tests && python -m
security.archive_corpus`` lists them).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from exporter.archive.schema import TENSOR_SCHEMA
from exporter.convert.compress import decompress_safetensors
from security.archive_files import (
    shard_path,
)

MARKER = b"NEOXSECRET"
STEP = 8
STEPS = (0, STEP)
DENSE = "gpt_neox.layers.0.attention.dense.weight"
DENSE_1 = "gpt_neox.layers.1.attention.dense.weight"
MODEL = f"steps/step{STEP}/model.safetensors"
PACKED = f"{MODEL}.zst"
#: a tensor name that is Markdown, HTML, a terminal escape, mathtext and a bidi override
HOSTILE_NAME = ("\x1b]0;owned\x07\x1b[2J<script>alert(1)</script><img src=x onerror=alert(1)>"
                " $\\notacommand{$ | [x](javascript:alert(1)) \u202e.layers.9.attention.dense.weight")
HOSTILE_TEXT = "<script>alert(2)</script> [click](javascript:alert(3)) <b>bold</b>\x1b[31m $x$"

Build = Callable[[Path, Path], None]


@dataclass(frozen=True)
class ArchiveCase:
    """One hostile archive: how to make it from a benign one, and what reading must do."""

    name: str
    family: str
    build: Build
    refused: str | None
    local_only: bool = False  # symlinks, or records that are never published: not on the Hub
    compressed: bool = False  # made from the archive with a compressed model file


CASES: dict[str, ArchiveCase] = {}


def case(family: str, refused: str | None, **options: bool) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES[build.__name__] = ArchiveCase(build.__name__, family, build, refused, **options)
        return build
    return register


def plant_outside(root: Path, outside: Path) -> None:
    """Files outside the archive that hostile paths point at; every one carries MARKER."""
    outside.mkdir()
    model = root / MODEL
    if not model.exists():  # the compressed archive: the same header, from the .zst file
        model = outside / "plain.safetensors"
        decompress_safetensors(root / PACKED, model)
    raw = model.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    data = raw[8 + length:]
    secret = raw[:8 + length] + (MARKER * (len(data) // len(MARKER) + 1))[:len(data)]
    (outside / "secret.safetensors").write_bytes(secret)  # same header: offsets agree
    shutil.copytree(root / "steps" / f"step{STEP}", outside / f"step{STEP}")
    (outside / f"step{STEP}" / "model.safetensors").write_bytes(secret)
    manifest = json.loads((root / "manifest.json").read_text())
    (outside / "manifest.json").write_text(json.dumps({**manifest, "source": MARKER.decode()}))
    (outside / "state.json").write_text(json.dumps({"secret": MARKER.decode()}))
    (outside / "tensors").mkdir()
    rows = pq.read_table(shard_path(root, "tensors", STEP)).to_pylist()
    for row in rows:
        row["name"] = f"{MARKER.decode()}.{row['name']}"
    pq.write_table(pa.Table.from_pylist(rows, schema=TENSOR_SCHEMA),
                   outside / "tensors" / f"step{STEP}.parquet")


def git_secret(root: Path, outside: Path) -> None:
    (root / ".git").mkdir()
    shutil.copy(outside / "secret.safetensors", root / ".git" / "secret.safetensors")


def link(path: Path, target: Path | str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)
