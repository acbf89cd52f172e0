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

Usage: ``cd tests && python -m security.hostile_archives`` lists the cases.
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
    edit_header,
    edit_row,
    edit_rows,
    edit_table,
    edit_zst_index,
    nested_json,
    read_safetensors,
    shard_path,
    write_safetensors,
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


def _git_secret(root: Path, outside: Path) -> None:
    (root / ".git").mkdir()
    shutil.copy(outside / "secret.safetensors", root / ".git" / "secret.safetensors")


def _link(path: Path, target: Path | str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


# -- paths from archive content --------------------------------------------------------------


@case("path", r"leaves the archive \('\.\.'\)")
def index_file_climbs_out(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file="../outside/secret.safetensors")


@case("path", "is absolute")
def index_file_is_absolute(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file=str(outside / "secret.safetensors"))


@case("path", "leaves the archive")
def index_file_climbs_out_through_its_step(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file=f"steps/step{STEP}/../../../outside/secret.safetensors")


@case("path", "holds a backslash")
def index_file_climbs_out_with_backslashes(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file="steps\\..\\..\\outside\\secret.safetensors")


@case("path", "control characters")
def index_file_holds_a_nul(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file=f"{MODEL}\x00/../../../outside/secret.safetensors")


@case("path", r"points into \.git")
def index_file_points_into_git(root: Path, outside: Path) -> None:
    _git_secret(root, outside)
    edit_row(root, STEP, DENSE, file=".git/secret.safetensors")


@case("path", "leads outside the archive", local_only=True)
def model_file_links_out(root: Path, outside: Path) -> None:
    _link(root / MODEL, outside / "secret.safetensors")


@case("path", "leads outside the archive", local_only=True)
def model_file_links_out_relatively(root: Path, outside: Path) -> None:
    _link(root / MODEL, "../../../outside/secret.safetensors")


@case("path", r"leads into \.git", local_only=True)
def model_file_links_into_git(root: Path, outside: Path) -> None:
    _git_secret(root, outside)
    _link(root / MODEL, "../../.git/secret.safetensors")


@case("path", "leads outside the archive", local_only=True)
def step_folder_links_out(root: Path, outside: Path) -> None:
    _link(root / "steps" / f"step{STEP}", outside / f"step{STEP}")


@case("path", "leads outside the archive", local_only=True)
def index_folder_links_out(root: Path, outside: Path) -> None:
    _link(root / "index" / "tensors", outside / "tensors")


@case("path", "leads outside the archive", local_only=True)
def manifest_links_out(root: Path, outside: Path) -> None:
    _link(root / "manifest.json", outside / "manifest.json")


@case("path", "leads outside the archive", local_only=True)
def state_json_links_out(root: Path, outside: Path) -> None:
    _link(root / "steps" / f"step{STEP}" / "state.json", outside / "state.json")


def _weight_map(root: Path, file: str) -> None:
    names = list(read_safetensors(root / MODEL)[0].keys() - {"__metadata__"})
    (root / "steps" / f"step{STEP}" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(names, file)}))


@case("path", r"weight_map\[.*leaves the archive")
def weight_map_climbs_out(root: Path, outside: Path) -> None:
    _weight_map(root, "../../../outside/secret.safetensors")


@case("path", r"weight_map\[.*is absolute")
def weight_map_is_absolute(root: Path, outside: Path) -> None:
    _weight_map(root, str(outside / "secret.safetensors"))


@case("path", r"output_files\[\d+\].*leaves the archive")
def output_files_climb_out(root: Path, outside: Path) -> None:
    def edit(rows: list[dict]) -> None:
        secret = outside / "secret.safetensors"
        rows[0]["output_files"].append({"path": "../outside/secret.safetensors",
                                        "sha256": "0" * 64, "bytes": secret.stat().st_size})
    edit_rows(root, STEP, edit, table="checkpoints")


@case("path", r"\.push/step8\.json: deleted.*leaves the archive", local_only=True)
def push_record_climbs_out(root: Path, outside: Path) -> None:
    (root / ".push").mkdir()
    (root / ".push" / f"step{STEP}.json").write_text(json.dumps(
        {"deleted": {"../outside/secret.safetensors": "0" * 64}}))


# -- safetensors headers, and their agreement with the index ----------------------------------


def _set(name: str, key: str, value: object) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header[name][key] = value
    return edit


def _shift(header: dict) -> None:
    begin, end = header[DENSE]["data_offsets"]
    header[DENSE]["data_offsets"] = [begin + 10**6, end + 10**6]


@case("header", r"'gpt_neox.layers.0.attention.dense.weight': data_offsets \[\d+, \d+\] run "
                r"outside the data section")
def offsets_run_past_the_end(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, _shift)


@case("header", r"hold 2048 bytes, but F16 \[32, 31\] needs 1984")
def offsets_disagree_with_the_shape(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, _set(DENSE, "shape", [32, 31]))


@case("header", "overlap")
def two_tensors_share_their_bytes(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, lambda h: h[DENSE_1].update(data_offsets=h[DENSE]["data_offsets"]))


@case("header", "unknown dtype 'F4'")
def unknown_dtype(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, _set(DENSE, "dtype", "F4"))


@case("header", "is not a list of at most 64 non-negative integers")
def negative_dimensions(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, _set(DENSE, "shape", [-32, -32]))


@case("header", "is not a list of at most 64 non-negative integers")
def sixty_five_dimensions(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, _set(DENSE, "shape", [1] * 65))


@case("header", "more elements than an int64 counts")
def absurd_shape(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, _set(DENSE, "shape", [2**40, 2**40, 0]))


@case("header", r"corrupt safetensors header \(length")
def header_length_past_the_end(root: Path, outside: Path) -> None:
    path = root / MODEL
    path.write_bytes((2**63).to_bytes(8, "little") + path.read_bytes()[8:])


@case("header", "corrupt safetensors header")
def header_is_not_json(root: Path, outside: Path) -> None:
    header, data = read_safetensors(root / MODEL)
    write_safetensors(root / MODEL, b"{not json" + b" " * 40, data)


@case("header", "appears twice")
def header_names_a_tensor_twice(root: Path, outside: Path) -> None:
    header, data = read_safetensors(root / MODEL)
    text = json.dumps(header)
    write_safetensors(root / MODEL, (text[:-1] + f", {json.dumps(DENSE)}: "
                                     f"{json.dumps(header[DENSE])}}}").encode(), data)


@case("header", "corrupt safetensors header")
def header_nested_too_deeply(root: Path, outside: Path) -> None:
    write_safetensors(root / MODEL, nested_json(100_000), read_safetensors(root / MODEL)[1])


@case("header", "__metadata__ is not a map of strings")
def metadata_holds_numbers(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, lambda h: h.update(__metadata__={"format": 1}))


@case("header", "belong to no tensor")
def bytes_belong_to_no_tensor(root: Path, outside: Path) -> None:
    edit_header(root / MODEL, lambda h: h.pop(DENSE_1))


@case("header", "not a safetensors file")
def file_of_four_bytes(root: Path, outside: Path) -> None:
    (root / MODEL).write_bytes(b"\x10\x00\x00\x00")


@case("header", r"step8\.parquet: model tensor '.*dense.weight': the index says BF16 \[32, 32\] "
                r"at bytes \d+-\d+, .*model.safetensors says F16 \[32, 32\]")
def index_and_header_disagree_on_dtype(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, dtype="bfloat16")


@case("header", r"the index says F16 \[1024\] .* says F16 \[32, 32\]")
def index_and_header_disagree_on_shape(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, shape=[1024])


@case("header", r"the index says F16 \[32, 32\] at bytes (\d+)-(\d+), .* at bytes (?!\1)")
def index_and_header_disagree_on_offsets(root: Path, outside: Path) -> None:
    row = next(r for r in pq.read_table(shard_path(root, "tensors", STEP)).to_pylist()
               if r["name"] == DENSE)
    edit_row(root, STEP, DENSE, data_offset_begin=row["data_offset_begin"] + 64,
             data_offset_end=row["data_offset_end"] + 64)


@case("header", r"the index says F16 \[1048576, 1048576\]")
def index_row_claims_two_terabytes(root: Path, outside: Path) -> None:
    row = next(r for r in pq.read_table(shard_path(root, "tensors", STEP)).to_pylist()
               if r["name"] == DENSE)
    edit_row(root, STEP, DENSE, shape=[2**20, 2**20], numel=2**40,
             data_offset_end=row["data_offset_begin"] + 2**41)


@case("header", r"model tensor 'gpt_neox.nothing' is not in .*model.safetensors")
def index_names_a_tensor_the_file_lacks(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, name="gpt_neox.nothing")


# -- compressed tensor files -------------------------------------------------------------------


def _frames_of(name: str, edit: Callable[[list], None]) -> Callable[[dict], None]:
    def apply(index: dict) -> None:
        edit(index[name]["frames"])
    return apply


@case("compressed", "outside the file or too large", compressed=True)
def frame_outside_the_file(root: Path, outside: Path) -> None:
    edit_zst_index(root / PACKED, _frames_of(DENSE, lambda f: f[0].__setitem__(0, 10**12)))


@case("compressed", "frames hold", compressed=True)
def frames_hold_more_than_the_tensor(root: Path, outside: Path) -> None:
    edit_zst_index(root / PACKED, _frames_of(DENSE, lambda f: f.append(list(f[0]))))


@case("compressed", "outside the file or too large", compressed=True)
def frame_claims_a_terabyte(root: Path, outside: Path) -> None:
    edit_zst_index(root / PACKED, _frames_of(DENSE, lambda f: f[0].__setitem__(2, 2**40)))


@case("compressed", "frames of tensors .* overlap", compressed=True)
def two_tensors_share_their_frames(root: Path, outside: Path) -> None:
    edit_zst_index(root / PACKED, lambda i: i[DENSE_1].update(frames=i[DENSE]["frames"]))


@case("compressed", r"nbytes 2050 for 2048 bytes|bytes \d+-\d+ at the end belong to no tensor",
      compressed=True)
def nbytes_disagree_with_the_header(root: Path, outside: Path) -> None:
    edit_zst_index(root / PACKED, lambda i: i[DENSE].update(nbytes=2050))


@case("compressed", "run outside the data section", compressed=True)
def embedded_header_runs_past_the_end(root: Path, outside: Path) -> None:
    def edit(index: dict) -> None:
        header = json.loads(index["__safetensors_header__"])
        _shift(header)
        index["__safetensors_header__"] = json.dumps(header)
    edit_zst_index(root / PACKED, edit)


@case("compressed", "unknown codec", compressed=True)
def codec_is_a_list(root: Path, outside: Path) -> None:
    edit_zst_index(root / PACKED, lambda i: i.update(__codec__=[]))


@case("compressed", r"needs \d+ bytes of memory|cannot allocate|damaged frame", compressed=True)
def tensor_claims_a_terabyte(root: Path, outside: Path) -> None:
    """1 TiB declared consistently everywhere, in 1,024 one-byte frames: never allocated."""
    placed: dict[str, int] = {}

    def edit(index: dict) -> None:
        header = json.loads(index["__safetensors_header__"])
        nbytes = 2**40
        for name, entry in header.items():
            if name != "__metadata__" and entry["data_offsets"][0] > header[DENSE]["data_offsets"][0]:
                entry["data_offsets"] = [o + nbytes - 2048 for o in entry["data_offsets"]]
        header[DENSE].update(shape=[2**19, 2**20], data_offsets=[
            header[DENSE]["data_offsets"][0], header[DENSE]["data_offsets"][0] + nbytes])
        index["__safetensors_header__"] = json.dumps(header)
        placed["begin"] = 8 + len(index["__safetensors_header__"]) + header[DENSE]["data_offsets"][0]
        offset, length, _ = index[DENSE]["frames"][0]
        assert length >= 1024, length  # the one-byte frames stay inside the tensor's own
        index[DENSE].update(shape=[2**19, 2**20], nbytes=nbytes,
                            frames=[[offset + i, 1, 2**30] for i in range(1024)])
    edit_zst_index(root / PACKED, edit)
    edit_row(root, STEP, DENSE, shape=[2**19, 2**20], numel=2**39,
             data_offset_begin=placed["begin"], data_offset_end=placed["begin"] + 2**40)


@case("compressed", r"the index says BF16 \[32, 32\]", compressed=True)
def index_and_compressed_header_disagree(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, dtype="bfloat16")


# -- index shards, manifest and JSON against the schemas ---------------------------------------


@case("schema", r"tensors/step8\.parquet: no column 'sha256'")
def index_lacks_a_column(root: Path, outside: Path) -> None:
    edit_table(root, STEP, lambda t: t.drop_columns(["sha256"]))


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


@case("schema", "sha256 is not 64 hex digits")
def index_sha256_is_markup(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, sha256="<script>alert(1)</script>")


@case("schema", "unreadable Parquet")
def index_shard_is_not_parquet(root: Path, outside: Path) -> None:
    shard_path(root, "tensors", STEP).write_bytes(b"PAR1" + bytes(100) + b"PAR1")


@case("schema", "not an index shard")
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
                row.update(layer=None, sha256="0" * 64)
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


if __name__ == "__main__":
    for c in CASES.values():
        print(f"{c.family:<11} {c.name:<45} {c.refused or 'reads, shown as text'}")
