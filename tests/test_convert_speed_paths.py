"""The fast conversion paths compute the same bytes, hashes and statistics as the slow, obvious ones.

References are computed independently: statistics in float64 with plain torch over the whole
tensor, hashes with hashlib over the tensor's bytes and over the written file, casts with
``Tensor.to``. The GPU path is checked against the CPU path on a CUDA device when there is
one; its pipeline logic (staging, buffer pool, NaN fix-up, per-chunk moments) also runs on the
CPU, which is checked everywhere.
"""

from __future__ import annotations

import doctest
import hashlib
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exporter.convert import compress as compress_module
from exporter.convert import stats as stats_module
from exporter.convert.compress import (
    compress_safetensors,
    decompress_safetensors,
    parse_compression,
    read_compressed_index,
    read_compressed_tensor,
    shuffle_bytes,
    unshuffle_bytes,
)
from exporter.convert.device import DeviceCastEngine
from exporter.convert.stats import StatsAccumulator
from exporter.convert.stream import Converter
from exporter.dtypes import as_dtype, to_torch
from exporter.errors import ArchiveError, ExporterError
from exporter.records import TensorJob, chunks_of

NAN, INF = float("nan"), float("inf")


def _reference(tensor: torch.Tensor) -> dict[str, float | int | None]:
    """Statistics the slow way: float64 copy of everything, finite values only."""
    values = tensor.reshape(-1)
    if values.dtype == torch.bool:
        values = values.to(torch.uint8)
    values = values.to(torch.float64)
    finite = values[torch.isfinite(values)]
    out: dict[str, float | int | None] = {
        "nan_count": int(torch.isnan(values).sum()),
        "inf_count": int(torch.isinf(values).sum()),
        "zero_count": int((values == 0).sum()),
    }
    if finite.numel() == 0:
        return out | {"min": None, "max": None, "mean": None, "std": None, "l2": None}
    mean = finite.sum() / finite.numel()
    return out | {
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(mean),
        "std": float(((finite - mean) ** 2).sum().div(finite.numel()).sqrt()),
        "l2": float(finite.pow(2).sum().sqrt()),
    }


def _assert_stats_match(got: object, tensor: torch.Tensor) -> None:
    want = _reference(tensor)
    for key in ("min", "max", "nan_count", "inf_count", "zero_count"):
        assert getattr(got, key) == want[key], key
    for key in ("mean", "std", "l2"):
        value, expected = getattr(got, key), want[key]
        if expected is None:
            assert value is None, key
        else:
            assert math.isclose(value, expected, rel_tol=1e-6, abs_tol=0.0), (key, value, expected)


def _samples() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 50_000
    spiky = torch.randn(n, generator=g)
    spiky[::997] = NAN
    spiky[5::1009] = INF
    spiky[7::1013] = -INF
    spiky[::101] = 0.0
    spiky[1::103] = -0.0
    return {
        "weights": torch.randn(n, generator=g) * 0.02,
        "norm weights": 1 + 0.05 * torch.randn(n, generator=g),
        "constant": torch.full((n,), 0.1),
        "large offset": 1000 + 1e-3 * torch.randn(n, generator=g),
        "cancelling": torch.tensor([1e8, 1.0, -1e8] * 3000),
        "adam second moment": torch.rand(n, generator=g) * 1e-8,
        "non-finite and zeros": spiky,
        "all nan": torch.full((3000,), NAN),
        "bfloat16": (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16),
        "float16 with nan": torch.where(torch.rand(n, generator=g) < 0.01, NAN,
                                        torch.randn(n, generator=g)).to(torch.float16),
        "float64": torch.randn(n, dtype=torch.float64, generator=g),
        "int64": torch.randint(-(2**40), 2**40, (n,), generator=g),
        "uint8": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(n, generator=g) < 0.3,
    }


@pytest.mark.parametrize("name", list(_samples()))
def test_fast_statistics_match_a_float64_reference(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small sub-blocks and odd chunk sizes so the merging of partial results is exercised.
    monkeypatch.setattr(stats_module, "SUB_BLOCK", 4096)
    tensor = _samples()[name]
    acc = StatsAccumulator()
    for chunk in chunks_of(tensor)(7001 * tensor.element_size()):
        acc.update(chunk, as_dtype(tensor.dtype))
    _assert_stats_match(acc.result(), tensor)


def test_statistics_of_an_empty_tensor_are_undefined() -> None:
    acc = StatsAccumulator()
    acc.update(torch.empty(0))
    assert acc.result().mean is None and acc.result().nan_count == 0


def test_merged_partials_equal_one_pass() -> None:
    tensor = torch.randn(10_000) * 3 + 1
    whole = StatsAccumulator()
    whole.update(tensor)
    parts = StatsAccumulator()
    for piece in tensor.split(3333):
        values = piece.double()
        parts.merge(piece.numel(), float(values.mean()), float(((values - values.mean()) ** 2).sum()),
                    float(values.min()), float(values.max()))
    a, b = whole.result(), parts.result()
    assert (a.min, a.max) == (b.min, b.max)
    for key in ("mean", "std", "l2"):
        assert math.isclose(getattr(a, key), getattr(b, key), rel_tol=1e-12)


def _jobs(tensors: dict[str, torch.Tensor], kind: str = "model") -> list[TensorJob]:
    return [TensorJob(name, kind, t.dtype, tuple(t.shape), chunks_of(t)) for name, t in tensors.items()]


def _written(tmp_path: Path, converter: Converter, tensors: dict[str, torch.Tensor],
             kind: str = "model") -> tuple[Path, list]:
    path = tmp_path / "out" / "file.safetensors"
    records = converter.write_file(path, _jobs(tensors, kind), tmp_path)
    return path, records


def _file_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    with_nan = torch.randn(70_000, generator=g)
    with_nan[::777] = NAN
    return {
        "embed": torch.randn(300, 257, generator=g),
        "empty": torch.empty(0, 4),
        "nan": with_nan,
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(1000),
        "half": torch.randn(5000, generator=g).half(),
    }


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_digests_and_casts_equal_blake3_hashlib_and_tensor_to(
    tmp_path: Path, dtype: torch.dtype | None
) -> None:
    tensors = _file_tensors()
    converter = Converter(dtype=dtype, chunk_bytes=4096)
    path, records = _written(tmp_path, converter, tensors)
    assert [r.job.name for r in records] == list(tensors)
    with safe_open(str(path), framework="pt") as f:
        for record in records:
            source = tensors[record.job.name]
            want = source.to(dtype) if dtype is not None and source.is_floating_point() else source
            got = f.get_tensor(record.job.name)
            assert got.dtype == want.dtype == record.dtype
            assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                               want.reshape(-1).view(torch.uint8) if want.numel() else want)
            raw = want.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert record.digest_algorithm == "blake3"
            assert record.digest == blake3.blake3(raw).hexdigest()
            assert path.read_bytes()[record.begin : record.end] == raw
            _assert_stats_match(record.stats, want)
    (written,) = converter.written_files
    assert written.path == "out/file.safetensors"
    assert written.size == path.stat().st_size
    assert written.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failing_source_leaves_no_file_and_raises_its_error(tmp_path: Path) -> None:
    def broken(max_bytes: int) -> Iterator[torch.Tensor]:
        yield torch.zeros(10)
        raise ExporterError("disk on fire")

    jobs = [TensorJob("a", "master", torch.float32, (100,), broken)]
    with pytest.raises(ExporterError, match="disk on fire"):
        Converter().write_file(tmp_path / "f.safetensors", jobs, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("numel", [99, 101])
def test_a_source_of_the_wrong_size_is_rejected(tmp_path: Path, numel: int) -> None:
    # Too few elements is caught by the feeding thread, too many by the writing thread.
    jobs = [TensorJob("a", "master", torch.float32, (100,), chunks_of(torch.zeros(numel))),
            TensorJob("b", "master", torch.float32, (10,), chunks_of(torch.zeros(10)))]
    with pytest.raises(ExporterError, match="'a'|a:"):
        Converter(chunk_bytes=64).write_file(tmp_path / "f.safetensors", jobs, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_every_source_byte(tmp_path: Path) -> None:
    seen: list[int] = []
    tensors = {"a": torch.randn(1000), "b": torch.randn(10).half()}
    Converter(chunk_bytes=512, progress=seen.append).write_file(
        tmp_path / "f.safetensors", _jobs(tensors), tmp_path)
    assert sum(seen) == 4000 + 20


def test_device_selection() -> None:
    assert Converter(device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ExporterError, match="unknown device"):
        Converter(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ExporterError, match="no CUDA device"):
            Converter(device="cuda")


def _engine_outputs(engine: DeviceCastEngine, source: torch.Tensor, dtype: torch.dtype,
                    chunk_bytes: int) -> tuple[torch.Tensor, StatsAccumulator]:
    stats = StatsAccumulator()
    parts = []
    held = []
    for values, release in engine.cast(chunks_of(source)(chunk_bytes), as_dtype(source.dtype),
                                       as_dtype(dtype), stats):
        parts.append(to_torch(values.copy(), as_dtype(dtype)))
        held.append(release)
        if len(held) > 1:  # a consumer releasing late, out of step with the engine
            held.pop(0)()
    for release in held:
        release()
    return torch.cat(parts), stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_device_engine_logic_on_the_cpu_matches_the_cpu_path(dtype: torch.dtype) -> None:
    source = _file_tensors()["nan"]
    engine = DeviceCastEngine("cpu", chunk_bytes=4096 * 4, slots=2, output_buffers=3)
    out, stats = _engine_outputs(engine, source, dtype, 4096 * 4)
    assert torch.equal(out.view(torch.uint8), source.to(dtype).view(torch.uint8))
    _assert_stats_match(stats.result(), source.to(dtype))


def test_device_engine_feeds_write_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _file_tensors()
    plain = Converter(dtype=torch.bfloat16, chunk_bytes=8192)
    plain_path, plain_records = _written(tmp_path / "plain", plain, tensors)
    engine = DeviceCastEngine("cpu", chunk_bytes=8192)
    routed = Converter(dtype=torch.bfloat16, chunk_bytes=8192)
    cpu_engine = routed.engine_for
    monkeypatch.setattr(routed, "engine_for",
                        lambda job: engine if job.dtype.is_floating_point else cpu_engine(job))
    path, records = _written(tmp_path / "routed", routed, tensors)
    assert path.read_bytes() == plain_path.read_bytes()
    for a, b in zip(records, plain_records, strict=True):
        assert a.digest == b.digest
        _assert_stats_match(a.stats, tensors[a.job.name].to(a.dtype.torch))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_path_writes_the_cpu_paths_bytes(tmp_path: Path, dtype: torch.dtype | None) -> None:
    g = torch.Generator().manual_seed(2)
    big = torch.randn(3_000_000, generator=g)
    big[::12345] = NAN
    big[1::54321] = -INF
    tensors = {**_file_tensors(), "big": big, "big half": big.half()}
    cpu_path, cpu_records = _written(tmp_path / "cpu", Converter(dtype=dtype, device="cpu"), tensors)
    gpu = Converter(dtype=dtype, device="cuda", chunk_bytes=1 << 20)
    gpu_path, gpu_records = _written(tmp_path / "gpu", gpu, tensors)
    assert gpu_path.read_bytes() == cpu_path.read_bytes()
    for a, b in zip(gpu_records, cpu_records, strict=True):
        assert a.digest == b.digest
        _assert_stats_match(a.stats, tensors[a.job.name].to(a.dtype.torch))


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_byte_shuffle_round_trips(itemsize: int) -> None:
    raw = torch.randint(0, 256, (itemsize * 1000,), dtype=torch.uint8).numpy()
    shuffled = shuffle_bytes(raw, itemsize)
    # Byte 0 of every element first: the shuffle really regroups.
    assert (shuffled[:1000] == raw[::itemsize]).all()
    back = raw.copy()
    back[:] = 0
    unshuffle_bytes(shuffled, itemsize, back)
    assert (back == raw).all()


def test_compressed_files_round_trip_tensor_by_tensor_and_byte_for_byte(tmp_path: Path) -> None:
    tensors = {
        "w": (torch.randn(300, 70) * 0.02).to(torch.bfloat16),
        "m": torch.randn(5000),
        "v": torch.rand(5000) * 1e-8,
        "ids": torch.arange(100),
        "mask": torch.rand(33) < 0.5,
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
    }
    src = tmp_path / "t.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})
    report = compress_safetensors(src, tmp_path / "t.zst", level=3, frame_bytes=1000)
    assert report.tensors == len(tensors)
    assert report.raw_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    # Several frames per large tensor, so one tensor can be read without the others.
    assert len(read_compressed_index(tmp_path / "t.zst")["m"]["frames"]) == 20
    for name, tensor in tensors.items():
        got = read_compressed_tensor(tmp_path / "t.zst", name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor)
    decompress_safetensors(tmp_path / "t.zst", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


def test_shuffled_zstd_beats_plain_zstd_on_float_weights(tmp_path: Path) -> None:
    import zstandard

    weights = {"w": torch.randn(200_000) * 0.02}
    src = tmp_path / "w.safetensors"
    save_file(weights, str(src))
    report = compress_safetensors(src, tmp_path / "w.zst")
    plain = len(zstandard.ZstdCompressor(level=3).compress(src.read_bytes()))
    assert report.compressed_bytes < plain


def test_damaged_compressed_files_raise_archive_errors(tmp_path: Path) -> None:
    src = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(1000)}, str(src))
    compress_safetensors(src, tmp_path / "t.zst")
    with pytest.raises(ArchiveError, match="no tensor"):
        read_compressed_tensor(tmp_path / "t.zst", "b")
    data = bytearray((tmp_path / "t.zst").read_bytes())
    data[20] ^= 0xFF
    (tmp_path / "bad.zst").write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="damaged frame|wrong length"):
        read_compressed_tensor(tmp_path / "bad.zst", "a")
    (tmp_path / "cut.zst").write_bytes(bytes(data[:-3]))
    with pytest.raises(ArchiveError, match="truncated"):
        read_compressed_tensor(tmp_path / "cut.zst", "a")


@pytest.mark.parametrize("spec, level", [("zstd", 3), ("zstd:1", 1), ("ZSTD:19", 19)])
def test_compression_spec_parses(spec: str, level: int) -> None:
    assert parse_compression(spec) == level


@pytest.mark.parametrize("spec", ["gzip", "zstd:0", "zstd:99", "zstd:fast"])
def test_bad_compression_spec_is_refused(spec: str) -> None:
    with pytest.raises(ExporterError):
        parse_compression(spec)


def test_pipeline_threads_do_not_outlive_write_file(tmp_path: Path) -> None:
    before = threading.active_count()
    Converter(chunk_bytes=1024).write_file(tmp_path / "f.safetensors",
                                           _jobs({"a": torch.randn(10_000)}), tmp_path)
    assert threading.active_count() == before


@pytest.mark.parametrize("module", [stats_module, compress_module])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
