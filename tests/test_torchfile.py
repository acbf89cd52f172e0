"""The pickle-free reader returns the same tensors torch.load does, and executes nothing."""

from __future__ import annotations

import argparse
import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.dtypes import to_torch
from exporter.errors import CheckpointFormatError, ExporterError, UnsafePickleError
from exporter.torchfile import PickledObject, TensorRef, load_torch_file, to_json


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    return obj


def test_every_tensor_matches_torch_load(tmp_path: Path) -> None:
    base = torch.randn(6, 8)
    saved = {
        "fp32": base,
        "fp16_transposed": base.half().t(),
        "bf16_slice": base.bfloat16()[2:4],
        "int": torch.arange(10, dtype=torch.int64),
        "bool": base > 0,
        "nested": [collections.OrderedDict(a=base[1], b=torch.zeros(0))],
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    torch.save(saved, tmp_path / "x.pt")
    reference = torch.load(tmp_path / "x.pt", weights_only=False)
    tf = load_torch_file(tmp_path / "x.pt")
    paths = dict(tf.tensors())
    assert set(paths) == {"fp32", "fp16_transposed", "bf16_slice", "int", "bool", "nested.0.a",
                          "nested.0.b", "scalar"}
    for key, ref in paths.items():
        expected = _lookup(reference, key)
        got = ref.read()
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert torch.equal(got, expected), key
        chunks = list(ref.iter_chunks(16)) or [np.empty(0, dtype=ref.dtype.numpy)]
        assert torch.equal(to_torch(np.concatenate(chunks), ref.dtype).reshape(expected.shape),
                           expected)


def test_non_tensor_values_become_plain_json(tmp_path: Path) -> None:
    np.random.seed(3)
    saved = {
        "args": argparse.Namespace(lr=0.1, layers=[1, 2]),
        "np_state": np.random.get_state(),
        "np_scalar": np.float32(2.5),
        "names": {"b", "a"},
        "size": torch.Size([3, 4]),
        "dtype": torch.bfloat16,
    }
    torch.save(saved, tmp_path / "x.pt")
    tf = load_torch_file(tmp_path / "x.pt")
    rendered = to_json(tf.obj)
    assert rendered["args"] == {"__class__": "argparse.Namespace", "state": {"lr": 0.1, "layers": [1, 2]}}
    assert rendered["np_state"][1]["data"] == np.random.get_state()[1].tolist()
    assert rendered["np_scalar"] == 2.5
    assert rendered["names"] == ["a", "b"]
    assert rendered["size"] == [3, 4]
    assert rendered["dtype"] == "torch.bfloat16"
    assert tf.unknown_globals == []


class Marker:
    """Pickles as a call that would create a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_payload_never_runs_and_becomes_an_inert_record(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": Marker(marker)}, tmp_path / "x.pt")
    tf = load_torch_file(tmp_path / "x.pt")
    assert not marker.exists()
    evil = tf.obj["evil"]
    assert isinstance(evil, PickledObject)
    assert evil.qualname in ("posix.system", "os.system", "nt.system")
    assert evil.args == (f"touch {marker}",)
    assert tf.unknown_globals == [evil.qualname]
    assert torch.equal(tf.obj["w"].read(), torch.ones(2))


def test_tensor_records_cannot_be_modified_by_build(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "x.pt")
    with zipfile.ZipFile(tmp_path / "x.pt") as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        data = z.read(name)
    # BUILD on the rebuilt tensor with a dict that would enlarge its shape.
    patched = data[:-2] + pickle.dumps({"shape": (10**9,)}, protocol=2)[2:-1] + b"b" + data[-2:]
    _rewrite_pickle(tmp_path / "x.pt", tmp_path / "y.pt", patched)
    with pytest.raises(ExporterError):
        load_torch_file(tmp_path / "y.pt")


def _rewrite_pickle(src: Path, dst: Path, pickle_bytes: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = pickle_bytes if info.filename.endswith("data.pkl") else zin.read(info.filename)
            zout.writestr(info.filename, data)


def test_shape_past_the_storage_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "x.pt")
    with zipfile.ZipFile(tmp_path / "x.pt") as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    # torch.save pickles the size tuple as K\x04 (BININT1 4); make it 400 via BININT2.
    assert b"K\x04\x85" in data
    patched = data.replace(b"K\x04\x85", b"M\x90\x01\x85", 1)
    _rewrite_pickle(tmp_path / "x.pt", tmp_path / "y.pt", patched)
    with pytest.raises(CheckpointFormatError, match="past the storage"):
        load_torch_file(tmp_path / "y.pt")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x00" * 100, "not a torch zip"),
        (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), "legacy"),
    ],
)
def test_non_checkpoints_get_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


def test_legacy_format_written_by_torch_is_refused_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy") as info:
        load_torch_file(path)
    assert "old.pt" in str(info.value)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(1000)}, tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError):
        load_torch_file(tmp_path / "t.pt").tensors()[0][1].read()


def test_memo_index_bomb_is_refused_before_unpickling() -> None:
    from exporter.torchfile.unpickler import safe_unpickle

    bomb = b"\x80\x02K\x01r\xff\xff\xff\x7f."  # LONG_BINPUT 2**31-1
    with pytest.raises(UnsafePickleError, match="memo"):
        safe_unpickle(bomb)


def test_tensor_ref_is_not_a_live_tensor(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "x.pt")
    ref = load_torch_file(tmp_path / "x.pt").obj["w"]
    assert isinstance(ref, TensorRef)
    assert (ref.dtype, ref.shape, ref.nbytes) == (torch.float32, (3,), 12)


def test_storages_are_found_in_one_table_and_faults_still_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file of many storages looks each one up in the table of the zip's storage members
    # (TorchZip.storage_spans), not through a checked look-up per storage; a storage the table
    # lacks (a compressed member, a key no torch writer makes) is refused by the checked path.
    from exporter.torchfile.container import TorchZip
    from tests.zip_builders import members_of, rezip, torch_bytes

    checked: list[str] = []
    real = TorchZip.storage_span

    def spy(self: TorchZip, key: str) -> tuple[int, int]:
        checked.append(key)
        return real(self, key)

    monkeypatch.setattr(TorchZip, "storage_span", spy)
    values = [torch.full((3,), float(i)) for i in range(50)]
    torch.save(values, tmp_path / "many.pt")
    refs = load_torch_file(tmp_path / "many.pt").obj
    assert checked == []
    assert [ref.read().tolist() for ref in refs] == [v.tolist() for v in values]
    assert len({ref.storage.file_offset for ref in refs}) == 50

    members = members_of(torch_bytes([torch.ones(4), torch.zeros(2)]))
    # A member whose name no torch writer makes leaves the other storages in the table.
    (tmp_path / "odd.pt").write_bytes(rezip([*members, ("archive/data/odd$name", b"")]))
    assert [ref.read().tolist() for ref in load_torch_file(tmp_path / "odd.pt").obj] \
        == [[1.0] * 4, [0.0] * 2]
    assert checked == []
    (tmp_path / "deflated.pt").write_bytes(rezip(members, compress="archive/data/1"))
    with pytest.raises(CheckpointFormatError, match="'archive/data/1' is compressed"):
        load_torch_file(tmp_path / "deflated.pt")
    assert checked == ["0", "1"] or checked == ["1"]
    # A member whose size disagrees with the pickle's element count.
    resized = [(n, b + b"\0" * 4 if n == "archive/data/0" else b) for n, b in members]
    (tmp_path / "resized.pt").write_bytes(rezip(resized))
    with pytest.raises(CheckpointFormatError, match="storage '0' should hold 16 bytes"):
        load_torch_file(tmp_path / "resized.pt")
