"""Chunk statistics against exact arithmetic, on data chosen to break summation shortcuts.

The reference is exact: every finite value is an integer multiple of 2**-1074, so sums of the
values and of their squares are Python integers, and mean, std and l2 are rounded once at the
end. The accumulator must agree to within a few float64 rounding errors (relative to the sum
of magnitudes for the mean, whose error scales with it), which float32 accumulation (1e-7),
or the one-pass ``Σx² - (Σx)²/n`` on data far from zero (all digits lost), would not.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.convert import stats as stats_module
from exporter.convert.stats import StatsAccumulator
from exporter.records import TensorStats

NAN, INF = float("nan"), float("inf")
SCALE = 1074  # 2**-1074 is the smallest float64 step
TOL = 1e-13


def _exact(tensor: torch.Tensor) -> dict[str, float | int | None]:
    values = tensor.reshape(-1)
    if values.dtype == torch.bool:
        values = values.to(torch.uint8)
    floats = values.to(torch.float64).tolist()
    finite = [x for x in floats if math.isfinite(x)]
    out: dict[str, float | int | None] = {
        "nan_count": sum(x != x for x in floats),
        "inf_count": sum(math.isinf(x) for x in floats),
        "zero_count": sum(x == 0 for x in floats),
        "abs_mean": math.fsum(abs(x) for x in finite) / max(len(finite), 1),
    }
    if not finite:
        return out | dict.fromkeys(("min", "max", "mean", "std", "l2"))
    n = len(finite)
    ints = []
    for x in finite:
        num, den = x.as_integer_ratio()
        ints.append(num << (SCALE - den.bit_length() + 1))
    s1, s2 = sum(ints), sum(i * i for i in ints)
    return out | {
        "min": min(finite),
        "max": max(finite),
        "mean": float(Fraction(s1, n << SCALE)),
        "std": math.sqrt(Fraction(n * s2 - s1 * s1, (n * n) << (2 * SCALE))),
        "l2": math.sqrt(Fraction(s2, 1 << (2 * SCALE))),
    }


def _assert_exact(got: TensorStats, tensor: torch.Tensor, tol: float = TOL) -> None:
    want = _exact(tensor)
    for key in ("min", "max", "nan_count", "inf_count", "zero_count"):
        assert getattr(got, key) == want[key], (key, getattr(got, key), want[key])
    if want["mean"] is None:
        assert got.mean is None and got.std is None and got.l2 is None
        return
    assert got.mean is not None and got.std is not None and got.l2 is not None
    assert want["std"] is not None and want["l2"] is not None and want["abs_mean"] is not None
    assert abs(got.mean - want["mean"]) <= tol * want["abs_mean"], ("mean", got.mean, want)
    assert abs(got.std - want["std"]) <= tol * want["std"], ("std", got.std, want["std"])
    assert abs(got.l2 - want["l2"]) <= tol * want["l2"], ("l2", got.l2, want["l2"])


def _summarise(tensor: torch.Tensor, chunk_elements: int | None = None) -> TensorStats:
    acc = StatsAccumulator()
    flat = tensor.reshape(-1)
    for chunk in flat.split(chunk_elements or max(flat.numel(), 1)):
        acc.update(chunk)
    return acc.result()


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = 20_000

    def randn(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(n, generator=g, dtype=dtype)

    spread = torch.exp(randn() * 15)  # magnitudes from about 1e-30 to 1e30
    return {
        "float32 weights": randn() * 0.02,
        "float32 large mean, tiny spread": 1000 + 1e-3 * randn(),
        "float32 norm weights": 1 + 0.05 * randn(),
        "float32 mixed magnitudes": randn() * spread,
        "float32 cancelling": torch.tensor([1e8, 1.0, -1e8] * 7000),
        "float32 one huge value": torch.cat([torch.tensor([3e38]), randn()]),
        "float32 positive, skewed": torch.rand(n, generator=g) ** 4 * 1e-8,
        "float32 uniform positive": torch.rand(n, generator=g) * 1e-8,  # Adam's exp_avg_sq
        "float64 large mean": 1e6 + 1e-6 * randn(torch.float64),
        "float64 mixed magnitudes": randn(torch.float64) * torch.exp(randn(torch.float64) * 40),
        "float16 weights": (randn() * 0.02).half(),
        "float16 large mean": (1000 + randn()).half(),
        "float16 extremes": torch.tensor([65504.0, -65504.0, 6e-8, -6e-8, 1.0] * 999).half(),
        "float16 all negative": (-1 - randn().abs()).half(),
        "bfloat16 weights": (randn() * 0.02).bfloat16(),
        "bfloat16 large mean": (1000 + 8 * randn()).bfloat16(),
        "bfloat16 mixed magnitudes": (randn() * spread).bfloat16(),
        "bfloat16 positive": (randn().abs() + 1e-30).bfloat16(),
        "int64 beyond 2**53": torch.randint(-(2**62), 2**62, (n,), generator=g),
        "int64 large mean": 2**40 + torch.randint(0, 3, (n,), generator=g),
        "int32": torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32),
        "int8": torch.randint(-128, 128, (n,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(n, generator=g) < 0.3,
        "complex64": torch.complex(randn(), 5 + randn()),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_one_chunk_matches_exact_arithmetic(name: str) -> None:
    tensor = CASES[name]
    if tensor.is_complex():
        _assert_exact(_summarise(tensor), torch.view_as_real(tensor))
    elif name == "int64 beyond 2**53":  # the values themselves round when they become float64
        _assert_exact(_summarise(tensor), tensor.double())
    else:
        _assert_exact(_summarise(tensor), tensor)


# Chunk sizes around the BLAS row (1024) and sub-block sizes, and coprime with both.
SPLITS = [1, 7, 1023, 1025, 3001, 7919]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", [n for n in CASES if "large mean" not in n])
def test_odd_chunk_and_sub_block_splits_agree_with_one_chunk(
    name: str, split: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large means are left out: merging partial means (Chan et al.) loses digits of the spread
    # when it is 1e-6 of the mean or less, a limit of the merge, not of a chunk's sums.
    tensor = CASES[name]
    whole = _summarise(tensor)
    monkeypatch.setattr(stats_module, "SUB_BLOCK", 2500)  # not a multiple of the row either
    parts = _summarise(tensor, split)
    for key in ("min", "max", "absmax", "nan_count", "inf_count", "zero_count"):
        assert getattr(parts, key) == getattr(whole, key), key
    for key in ("mean", "std", "l2"):
        scale = max(abs(whole.min or 0.0), abs(whole.max or 0.0)) if key == "mean" else 0.0
        a, b = getattr(parts, key), getattr(whole, key)
        assert abs(a - b) <= 1e-12 * max(abs(b), scale), (key, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["scattered", "whole chunks", "non-finite only"])
def test_nan_and_inf_are_counted_and_left_out(dtype: torch.dtype, layout: str) -> None:
    g = torch.Generator().manual_seed(2)
    values = (torch.randn(12_000, generator=g) * 3).to(dtype)
    if layout == "scattered":
        values[::97] = NAN
        values[5::101] = INF
        values[9::103] = -INF
        values[::211] = 0.0
        values[1::223] = -0.0
    elif layout == "whole chunks":
        values[:3000] = NAN
        values[6000:7000] = -INF
    else:
        values = torch.tensor([NAN, INF, -INF, NAN] * 1000, dtype=dtype)
    _assert_exact(_summarise(values, 1000), values)


CONSTANTS = [0.1, -3.5, 0.0, -0.0, 1e-40, 1e-300, 65504.0, 3.3e38, 7.0]
CONSTANT_CASES = [
    (dtype, value)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for value in CONSTANTS
    if not (dtype == torch.float16 and abs(value) > 65504)
] + [(torch.int64, -7), (torch.uint8, 7), (torch.bool, 1)]


@pytest.mark.parametrize(("dtype", "value"), CONSTANT_CASES)
def test_constant_data_has_exactly_zero_spread(
    dtype: torch.dtype, value: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stats_module, "SUB_BLOCK", 3000)
    tensor = torch.full((10_007,), value).to(dtype)
    datasets = [tensor]
    if dtype.is_floating_point:
        with_nan = tensor.clone()
        with_nan[::50] = NAN
        datasets.append(with_nan)
    for data in datasets:
        got = _summarise(data, 4099)
        stored = float(data[1])
        assert got.std == 0.0
        assert got.mean == stored and got.min == stored and got.max == stored
        assert got.l2 == pytest.approx(abs(stored) * math.sqrt(data.numel() - got.nan_count))
        assert got.zero_count == (data.numel() - got.nan_count if stored == 0 else 0)


def test_spread_of_one_value_in_a_constant_block_is_exact() -> None:
    tensor = torch.full((5000,), 0.1)
    tensor[1234] = 0.10000001
    _assert_exact(_summarise(tensor), tensor)


HALF_BITS = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=300)


@settings(max_examples=300, deadline=None, database=None)
@given(bits=HALF_BITS, dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_extremes_and_counts_from_bit_patterns(
    bits: list[int], dtype: torch.dtype
) -> None:
    # Any bit patterns: both zeros, subnormals, the largest finite values, inf, every NaN.
    tensor = torch.tensor(np.array(bits, dtype=np.uint16).view(np.int16)).view(dtype)
    _assert_exact(_summarise(tensor), tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values", [
    [-0.0], [0.0], [-0.0, 0.0], [-0.0, -1.0, -2.0], [0.0, 1.0, 2.0], [-0.0, 5.0], [0.0, -5.0],
    [-1.0, -2.0], [1.0, 2.0], [-1.0, 2.0], [2.0**-24, 0.0], [-(2.0**-24), -0.0],
])
def test_half_precision_signs_and_zeros(dtype: torch.dtype, values: list[float]) -> None:
    tensor = torch.tensor(values * 3000).to(dtype)
    _assert_exact(_summarise(tensor), tensor)


def test_blas_rows_stay_below_openblas_threading_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OpenBLAS's ddot starts its thread team above 10,000 elements (kernel/x86_64/ddot.c);
    # the rows handed to it must stay below, whatever the chunk and sub-block sizes.
    seen: list[int] = []
    real = stats_module._row_dots

    def spy(rows: np.ndarray, other: np.ndarray) -> np.ndarray:
        seen.append(rows.shape[-1])
        return real(rows, other)

    monkeypatch.setattr(stats_module, "_row_dots", spy)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32):
        StatsAccumulator().update((torch.randn(3 * stats_module.SUB_BLOCK + 17) * 5).to(dtype))
    assert seen and max(seen) <= 10_000


@pytest.mark.parametrize(("name", "passes"), [
    ("float32 weights", 1), ("float32 uniform positive", 1), ("float32 norm weights", 1),
    ("float32 large mean, tiny spread", 1), ("bfloat16 positive", 1),
    ("float32 large mean, one negative value", 2),
])
def test_sums_are_taken_once_unless_they_cancel(
    name: str, passes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Weights need no shift; one-signed data is shifted by a sampled mean first; only data
    # whose sums cancel (here: straddling zero, with a mean far above the spread) is reduced
    # a second time. A speed property, counted rather than timed.
    calls: list[int] = []
    real = stats_module._sums

    def spy(values: np.ndarray, total: bool = True) -> tuple[float, float]:
        calls.append(values.size)
        return real(values, total)

    monkeypatch.setattr(stats_module, "_sums", spy)
    if name in CASES:
        tensor = CASES[name]
    else:
        tensor = torch.cat([torch.tensor([-1.0]), CASES["float32 large mean, tiny spread"]])
    acc = StatsAccumulator()
    acc.update(tensor)
    assert len(calls) == passes
    _assert_exact(acc.result(), tensor)
