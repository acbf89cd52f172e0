"""An export on the CPU runs without importing torch (``exporter/dtypes.py``): its element
types are the package's own, equal to torch's, and torch comes in only to cast, to use a GPU
or to sum shards."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.convert.stats import StatsAccumulator
from exporter.dtypes import BY_NAME, DType, as_dtype, from_torch, to_torch
from exporter.errors import UnsafePickleError
from exporter.neox.zero.common import scalar
from exporter.samples import TINY, RunConfig, write_checkpoint, write_run
from exporter.torchfile import load_torch_file
from exporter.torchfile.unpickler import safe_unpickle
from exporter.verify import verify_path

ROOT = Path(__file__).resolve().parents[1]

# Runs the installed command's entry point and says, as the process exits, whether torch was
# ever imported.
PROBE = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, flush=True))
sys.argv = ["neox-export", *sys.argv[1:]]
from exporter.cli.main import run
run()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _probe(*args: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_cpu_export_never_imports_torch(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", TINY, step=8, dp=2, config=RunConfig(max_elements_per_comm=64))
    out = _probe("-q", "convert", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                 "--device", "cpu")
    assert "torch imported: False" in out
    reports = verify_path(tmp_path / "out")
    assert reports and all(r.ok for r in reports)


def test_a_build_never_imports_torch_and_a_cast_does(tmp_path: Path) -> None:
    write_run(tmp_path / "run", TINY, steps=[4], dp=2)
    out = _probe("-q", "build", str(tmp_path / "run"), "--out", str(tmp_path / "archive"),
                 "--device", "cpu")
    assert "torch imported: False" in out
    reports = verify_path(tmp_path / "archive")
    assert reports and all(r.ok for r in reports)
    out = _probe("-q", "convert", str(tmp_path / "run" / "step4"), "--out",
                 str(tmp_path / "bf16"), "--device", "cpu", "--dtype", "bf16")
    assert "torch imported: True" in out


def test_no_gpu_driver_means_no_cuda_without_asking_torch(tmp_path: Path) -> None:
    code = ("import sys; from exporter.convert import gpu; gpu.DRIVER_NODES = (sys.argv[1],); "
            "print(gpu.cuda_available(), 'torch' in sys.modules)")
    missing = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nvidia*")],
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert missing.stdout.split() == ["False", "False"], missing.stderr
    (tmp_path / "nvidia0").touch()  # a driver node: torch decides
    present = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nvidia*")],
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert present.stdout.split() == [str(torch.cuda.is_available()), "True"], present.stderr


def test_every_torch_dtype_has_an_equal_element_type() -> None:
    seen = 0
    for name, value in vars(torch).items():
        if not isinstance(value, torch.dtype):
            continue
        dtype = as_dtype(value)
        assert BY_NAME[name] is dtype and as_dtype(name) is dtype and dtype.torch is value
        assert dtype == value and value == dtype and str(dtype) == str(value)
        assert (dtype.itemsize, dtype.is_floating_point, dtype.is_complex) == (
            value.itemsize, value.is_floating_point, value.is_complex), name
        assert dtype.numpy.itemsize == dtype.itemsize, name
        assert dtype != (torch.float64 if value != torch.float64 else torch.float32)
        seen += 1
    assert seen >= 30
    assert pickle.loads(pickle.dumps(BY_NAME["bfloat16"])) is BY_NAME["bfloat16"]
    with pytest.raises(ValueError, match="not a tensor element type"):
        as_dtype("float128")


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float8_e4m3fn",
                                  "float8_e5m2", "int64", "uint8", "bool", "complex64"])
def test_arrays_and_tensors_share_their_bytes(name: str) -> None:
    tensor = (torch.arange(-6, 6, dtype=torch.float32) / 4).reshape(3, 4).to(getattr(torch, name))
    array, dtype = from_torch(tensor)
    assert dtype == tensor.dtype and array.shape == (3, 4)
    assert array.tobytes() == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    back = to_torch(array, dtype)
    assert back.dtype == tensor.dtype and torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_statistics_of_bit_patterns_are_those_of_their_values(name: str) -> None:
    dtype = BY_NAME[name]
    values = (torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype.torch)
    values[::97] = float("nan")
    bits, got_dtype = from_torch(values)
    assert bits.dtype == dtype.numpy and got_dtype is dtype
    from_bits, from_values = StatsAccumulator(), StatsAccumulator()
    for start in range(0, bits.size, 3001):
        from_bits.update(bits[start : start + 3001], dtype)
    from_values.update(values.to(torch.float64).numpy())
    got, want = from_bits.result(), from_values.result()
    for key in ("min", "max", "absmax", "nan_count", "inf_count", "zero_count"):
        assert getattr(got, key) == getattr(want, key), key
    for key in ("mean", "std", "l2"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-12), key
    assert want.nan_count > 0


def test_a_one_element_half_precision_tensor_is_a_python_number(tmp_path: Path) -> None:
    torch.save({"scale": torch.tensor([0.5], dtype=torch.bfloat16),
                "step": torch.tensor(7, dtype=torch.int64)}, tmp_path / "s.pt")
    obj = load_torch_file(tmp_path / "s.pt").obj
    assert scalar(obj["scale"]) == 0.5 and isinstance(scalar(obj["scale"]), float)
    assert scalar(obj["step"]) == 7 and isinstance(scalar(obj["step"]), int)


def test_a_pickle_cannot_change_a_dtype_for_later_files(tmp_path: Path) -> None:
    # torch.float32, then BUILD with {"itemsize": 8}: every later float32 storage would be
    # read at twice its size if the shared value took the state.
    hostile = b"\x80\x02ctorch\nfloat32\nq\x00}q\x01X\x08\x00\x00\x00itemsizeq\x02K\x08sb."
    with pytest.raises(UnsafePickleError, match="modify a dtype"):
        safe_unpickle(hostile)
    assert BY_NAME["float32"].itemsize == 4
    named = safe_unpickle(pickle.dumps({"dtype": torch.float32})).obj["dtype"]
    assert isinstance(named, DType) and named is BY_NAME["float32"]
    torch.save({"w": torch.arange(5, dtype=torch.float32)}, tmp_path / "w.pt")
    ref = load_torch_file(tmp_path / "w.pt").obj["w"]
    assert np.array_equal(ref.read_array(), np.arange(5, dtype=np.float32))
