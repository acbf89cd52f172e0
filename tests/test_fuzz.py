"""Fuzzing with a bounded budget: mutated torch files and pickles never crash or hang the reader.

Every mutated input must either read into consistent records (every tensor reads its bytes
or raises our error, the tree renders to JSON) or raise an ExporterError; any other exception,
or a read that outlives its time limit, is a bug. The streaming safetensors writer must agree
with the ``safetensors`` library on whatever it is given.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickletools
import signal
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from exporter.convert.safetensors_writer import SafetensorsWriter, TensorSpec
from exporter.errors import ExporterError
from exporter.records import SAFETENSORS_DTYPES
from exporter.torchfile import load_torch_file, to_json
from exporter.torchfile.container import TorchZip
from exporter.torchfile.unpickler import safe_unpickle

TIME_LIMIT = 10.0
# About 2-4 ms per example on a 2-core machine: the file runs in 20-30 s.
FUZZ = settings(max_examples=1500, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow])


class Hang(BaseException):
    """Raised by the time guard; a BaseException so that no ``except Exception`` hides it."""


@contextmanager
def time_limit(seconds: float = TIME_LIMIT) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _host_bytes() -> bytes:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.arange(8, dtype=torch.int64)
    value = {
        "w": base,
        "half_t": base.half().t(),
        "bf16_rows": base.bfloat16()[1:3],
        "int": shared,
        "int_view": shared[2:6],
        "flags": base > 10,
        "empty": torch.zeros(0, 3),
        "ordered": collections.OrderedDict(a=base[0], b=[1, 2.5, "x", None, b"raw"]),
        "np": np.arange(5, dtype=np.float32),
        "np_scalar": np.float64(1.5),
        "args": argparse.Namespace(lr=0.1, layers=[1, 2]),
        "names": {"b", "a"},
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "nested": ({"deep": [(1, (2, (3,)))]},),
    }
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


HOST = _host_bytes()


def _members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


MEMBERS = _members(HOST)
HOST_PICKLE = next(body for name, body in MEMBERS if name.endswith("/data.pkl"))


def _with_pickle(pickle_bytes: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, body in MEMBERS:
            z.writestr(name, pickle_bytes if name.endswith("/data.pkl") else body)
    return out.getvalue()


def _check_file(path: Path) -> str:
    """Read everything the file holds; ``read`` or ``refused``, anything else propagates."""
    with time_limit():
        try:
            tf = load_torch_file(path)
        except ExporterError:
            return "refused"
        for _, ref in tf.tensors():
            try:
                tensor = ref.read()
            except ExporterError:
                continue
            assert tensor.dtype == ref.dtype and tuple(tensor.shape) == ref.shape
            assert sum(chunk.size for chunk in ref.iter_chunks(8)) == ref.numel
        try:
            json.dumps(to_json(tf.obj), allow_nan=False)
        except ExporterError:
            return "refused"
        return "read"


POSITION = st.integers(min_value=0, max_value=2**31)
INTERESTING = st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, *b"().0R]bcdehjlqrstu}\x85\x86"])
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("set"), POSITION, INTERESTING),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 16)),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, pos, *rest in mutations:
        if not out:
            break
        pos %= len(out)
        if kind == "flip":
            out[pos] ^= 1 << rest[0]
        elif kind == "set":
            out[pos] = rest[0]
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = rest[0]
        else:
            del out[pos:pos + rest[0]]
    return bytes(out)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_host_file_reads_in_full(scratch: Path) -> None:
    path = scratch / "host.pt"
    path.write_bytes(HOST)
    assert _check_file(path) == "read"
    assert len(load_torch_file(path).tensors()) == 8


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_torch_file(scratch: Path, mutations: list[tuple]) -> None:
    path = scratch / "mutated.pt"
    path.write_bytes(_mutate(HOST, mutations))
    _check_file(path)


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_pickle_in_a_valid_container(scratch: Path, mutations: list[tuple]) -> None:
    path = scratch / "mutated-pickle.pt"
    path.write_bytes(_with_pickle(_mutate(HOST_PICKLE, mutations)))
    _check_file(path)


def _opcodes(data: bytes) -> list[bytes]:
    positions = [pos for _, _, pos in pickletools.genops(data)] + [len(data)]
    return [data[a:b] for a, b in zip(positions, positions[1:], strict=False)]


HOST_OPS = _opcodes(HOST_PICKLE)
GADGETS = [
    b"cos\nsystem\n", b"cbuiltins\nset\n", b"ccollections\nOrderedDict\n", b"cnumpy\ndtype\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"c_codecs\nencode\n",
    b"ccopyreg\n_reconstructor\n", b"ctorch._tensor\n_rebuild_from_type_v2\n",
    b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\nscalar\n",
    b"R", b"b", b"\x81", b"\x92", b"\x93", b"i__main__\nX\n", b"o", b"\x82\x01", b"(", b"t",
    b"l", b"d", b"e", b"u", b"s", b"a", b"0", b"1", b"2", b"\x85", b"\x86", b"\x87", b")",
    b"]", b"}", b"\x8f", b"\x90", b"\x91", b"N", b"\x88", b"K\x05", b"J\xff\xff\xff\xff",
    b"\x8a\x09" + b"\xff" * 9, b"h\x00", b"h\x05", b"j\x00\x00\x00\x00", b"q\x7f",
    b"r\xff\xff\x00\x00", b"\x94", b"Q", b"Pabc\n", b"X\x01\x00\x00\x000", b"C\x04abcd",
    b"G\x7f\xf0\x00\x00\x00\x00\x00\x00", b"\x97", b"\x98", b"\x95\x01" + bytes(7),
]
OP_EDIT = st.one_of(
    st.tuples(st.just("swap"), POSITION, POSITION),
    st.tuples(st.just("duplicate"), POSITION),
    st.tuples(st.just("drop"), POSITION),
    st.tuples(st.just("insert"), POSITION, st.sampled_from(GADGETS)),
    st.tuples(st.just("replace"), POSITION, st.sampled_from(GADGETS)),
)


def _edit_opcodes(ops: list[bytes], edits: list[tuple]) -> bytes:
    out = list(ops)
    for kind, pos, *rest in edits:
        if not out:
            break
        i = pos % len(out)
        if kind == "swap":
            j = rest[0] % len(out)
            out[i], out[j] = out[j], out[i]
        elif kind == "duplicate":
            out.insert(i, out[i])
        elif kind == "drop":
            del out[i]
        elif kind == "insert":
            out.insert(i, rest[0])
        else:
            out[i] = rest[0]
    return b"".join(out)


@FUZZ
@given(edits=st.lists(OP_EDIT, min_size=1, max_size=5))
def test_opcode_level_mutations(scratch: Path, edits: list[tuple]) -> None:
    pickle_bytes = _edit_opcodes(HOST_OPS, edits)
    path = scratch / "opcodes.pt"
    path.write_bytes(_with_pickle(pickle_bytes))
    _check_file(path)
    with time_limit():
        try:
            safe_unpickle(pickle_bytes, TorchZip(path))
        except ExporterError:
            pass


@settings(FUZZ, max_examples=3000)
@given(body=st.binary(max_size=300), proto=st.sampled_from([b"", b"\x80\x02", b"\x80\x05"]))
def test_arbitrary_bytes_as_a_pickle(body: bytes, proto: bytes) -> None:
    with time_limit():
        try:
            result = safe_unpickle(proto + body)
        except ExporterError:
            return
        try:
            json.dumps(to_json(result.obj), allow_nan=False)
        except ExporterError:
            pass


# safetensors writer against the safetensors library's reader
DTYPES = sorted((dtype.torch for dtype in SAFETENSORS_DTYPES), key=str)
SPEC = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 5), min_size=0, max_size=4),
)
NAME = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20).filter(
    lambda n: n != "__metadata__")


def _random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


@settings(FUZZ, max_examples=300)
@given(specs=st.lists(SPEC, max_size=6), names=st.lists(NAME, min_size=6, max_size=6,
                                                        unique=True),
       chunk=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       metadata=st.dictionaries(NAME, st.text(max_size=10), max_size=3))
def test_safetensors_writer_round_trip(scratch: Path, specs: list[tuple], names: list[str],
                                       chunk: int, seed: int, metadata: dict[str, str]) -> None:
    tensors = {names[i]: _random_tensor(dtype, shape, seed + i)
               for i, (dtype, shape) in enumerate(specs)}
    path = scratch / "round-trip.safetensors"
    path.unlink(missing_ok=True)
    writer = SafetensorsWriter(path, [TensorSpec(n, t.dtype, tuple(t.shape))
                                      for n, t in tensors.items()], metadata)
    with writer:
        for name, tensor in tensors.items():
            raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
            for start in range(0, len(raw), chunk):
                writer.write(name, raw[start:start + chunk])
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(tensors)
        assert (f.metadata() or {}) == ({k: v for k, v in metadata.items()} if metadata else {})
        for name, expected in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8),
                               expected.reshape(-1).view(torch.uint8))
    assert [p.name for p in scratch.iterdir() if ".tmp-" in p.name] == []


def test_safetensors_writer_leaves_nothing_when_a_tensor_falls_short(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    with pytest.raises(ExporterError, match="never written in full"):
        with SafetensorsWriter(path, [TensorSpec("a", torch.float32, (4,))]) as writer:
            writer.write("a", bytes(8))
    assert list(tmp_path.iterdir()) == []
