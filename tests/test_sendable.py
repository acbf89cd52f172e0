"""A file's tree sent by the forked reader comes back as the reader here reads it: records
added in one go (lists of tensors, lists of same-key dicts of tensors) keep every shared
record and storage shared, and anything irregular takes the record-by-record path."""

from __future__ import annotations

import marshal
from pathlib import Path
from typing import Any

import torch

from exporter.torchfile import load_torch_file, to_json
from exporter.torchfile.sendable import Decoder, Encoder
from exporter.torchfile.tree import iter_tensors


def _round_trip(path: Path) -> tuple[Any, Any, Any]:
    here = load_torch_file(path)
    encoded, refs, storages, _ = Encoder().encode_file(here)
    sent = marshal.loads(marshal.dumps((encoded, refs, storages)))
    got = Decoder(path, sent[1], sent[2]).decode(sent[0])
    return here.obj, got, encoded


def _records(tree: Any) -> list[tuple[Any, ...]]:
    # Each record once, under its first path: a shared record sent as two differs here.
    return [(path, ref.storage.key, ref.dtype, ref.file_offset, ref.offset, ref.shape,
             ref.stride, ref.numel, ref.requires_grad) for path, ref in iter_tensors(tree)]


def _same(here: Any, got: Any) -> None:
    assert to_json(got) == to_json(here)
    assert _records(got) == _records(here)


def test_a_list_of_new_tensors_is_sent_as_one_range(tmp_path: Path) -> None:
    subs = [torch.full((3 + i % 4,), float(i)) for i in range(50)]
    torch.save({"subs": subs, "half": [t.half() for t in subs[:5]]}, tmp_path / "f.pt")
    here, got, encoded = _round_trip(tmp_path / "f.pt")
    assert encoded["subs"] == ("TL", (0, 50))  # one range of indices, no index per tensor
    assert encoded["half"] == ("TL", (50, 5))
    _same(here, got)
    assert [r.read().tolist() for r in got["subs"]] == [t.tolist() for t in subs]
    assert got["half"][4].dtype == torch.float16


def test_records_sent_in_one_go_stay_shared_with_later_references(tmp_path: Path) -> None:
    subs = [torch.arange(4.0) + i for i in range(10)]
    state = {"subs": subs, "again": subs[3], "also": [subs[7], torch.zeros(2)],
             "named": {"x": subs[5]}}
    torch.save(state, tmp_path / "f.pt")
    here, got, encoded = _round_trip(tmp_path / "f.pt")
    _same(here, got)
    assert encoded["subs"] == ("TL", (0, 10))
    assert isinstance(encoded["also"][1], list)  # holds a record sent before: one by one
    assert got["again"] is got["subs"][3]
    assert got["also"][0] is got["subs"][7] and got["named"]["x"] is got["subs"][5]


def test_a_record_seen_before_or_a_shared_storage_takes_the_one_by_one_path(
        tmp_path: Path) -> None:
    base = torch.arange(12.0)
    first = torch.ones(2)
    state = {"first": first, "later": [torch.zeros(1), first],
             "views": [base[0:4], base[4:8], base[8:12]], "twice": [base[:2], base[:2]]}
    torch.save(state, tmp_path / "f.pt")
    here, got, encoded = _round_trip(tmp_path / "f.pt")
    _same(here, got)
    assert isinstance(encoded["later"][1], list) and isinstance(encoded["views"][1], list)
    assert got["later"][1] is got["first"]
    assert got["views"][0].storage is got["views"][2].storage  # one storage, as in the file
    assert got["twice"][0].storage is got["views"][0].storage


def test_adam_moments_one_dict_per_interval_are_one_node(tmp_path: Path) -> None:
    moments = [{"exp_avg": torch.full((5,), float(i)), "exp_avg_sq": torch.full((5,), i * 2.0)}
               for i in range(40)]
    odd = [{"exp_avg": torch.zeros(2), "exp_avg_sq": torch.ones(2)},
           {"exp_avg_sq": torch.ones(2), "exp_avg": torch.zeros(2)}]  # keys in another order
    mixed = [{"exp_avg": torch.zeros(2), "step": 3}, {"exp_avg": torch.zeros(2), "step": 4}]
    torch.save({"state": moments, "odd": odd, "mixed": mixed}, tmp_path / "f.pt")
    here, got, encoded = _round_trip(tmp_path / "f.pt")
    tag, keys, count, indices = encoded["state"]
    assert (tag, keys, count, indices) == ("TDL", ["exp_avg", "exp_avg_sq"], 40, (0, 80))
    assert isinstance(encoded["odd"], list) and isinstance(encoded["mixed"], list)
    _same(here, got)
    assert [list(d) for d in got["odd"]] == [["exp_avg", "exp_avg_sq"], ["exp_avg_sq", "exp_avg"]]
    assert got["state"][39]["exp_avg_sq"].read().tolist() == [78.0] * 5
    assert type(got["state"][0]) is dict and got["mixed"][1]["step"] == 4
