"""Hostile archives, ``header`` and ``compressed`` families: safetensors headers, ``.zst``
indexes, and their agreement with the index."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from security.archive_files import (
    edit_header,
    edit_row,
    edit_zst_index,
    nested_json,
    read_safetensors,
    shard_path,
    write_safetensors,
)
from security.hostile_archives import DENSE, DENSE_1, MODEL, PACKED, STEP, case

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
