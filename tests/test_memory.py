"""Peak memory of an export: bounded by about one tensor, not by the checkpoint.

The checkpoint has Pythia's vocabulary at hidden size 1024 and one block, so one parameter
(the embedding, and the output layer) is 51.5 M elements: 206 MB in fp32, 103 MB in the fp16
layer files; the whole folder holds 1.6 GB, 1.4 GB of it ZeRO optimizer state over two
data-parallel ranks. ``neox-export convert`` runs as a child process; its peak RSS is read
with ``os.wait4`` by a small launcher process, because Linux counts a parent's resident pages
at fork time into the child's peak (and the test process holds torch and more).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.samples import ModelShape, parameter_specs, write_checkpoint

SHAPE = ModelShape(num_layers=1, hidden_size=1024, num_heads=16, vocab_size=50304,
                   seq_length=2048, name="wide")
MB = 10**6

_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "max_rss": usage.ru_maxrss * 1024,
                  "stderr": err.decode("utf-8", "replace")[-2000:]}))
"""


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("memory")
    write_checkpoint(root / "checkpoint", SHAPE, dp=2)
    yield root / "checkpoint"
    shutil.rmtree(root, ignore_errors=True)  # 1.5 GB: not kept for the rest of the suite


def _peak_rss_of_convert(checkpoint: Path, out: Path, *options: str) -> int:
    cli = Path(sys.executable).parent / "neox-export"
    # Measure the installed command itself: a fallback that ran something else would measure
    # the memory of the wrong process.
    assert cli.exists(), f"{cli}: the neox-export console script is not installed"
    command = [str(cli)]
    command += ["-q", "convert", str(checkpoint), "--out", str(out), "--device", "cpu", *options]
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], check=True,
                          capture_output=True, text=True)
    report = json.loads(done.stdout)
    assert report["code"] == 0, report["stderr"]
    return report["max_rss"]


def test_the_checkpoint_has_one_200_mb_tensor_and_over_1_gb(wide_checkpoint: Path) -> None:
    largest = max(s.numel for s in parameter_specs(SHAPE, tp=1, tp_rank=0)) * 4
    total = sum(p.stat().st_size for p in wide_checkpoint.iterdir())
    optimizer = sum(p.stat().st_size for p in wide_checkpoint.glob("zero_pp_rank_*"))
    assert 200 * MB < largest < 210 * MB
    assert total > 1000 * MB and optimizer > 1000 * MB


def test_converting_a_checkpoint_with_a_200_mb_tensor_stays_below_500_mb(
    wide_checkpoint: Path, tmp_path: Path
) -> None:
    peak = _peak_rss_of_convert(wide_checkpoint, tmp_path / "out", "--dtype", "bf16")
    assert (tmp_path / "out" / "optimizer" / "exp_avg_sq.safetensors").exists()
    assert peak < 500 * MB, f"peak RSS {peak / MB:.0f} MB"


def test_reconstructing_1_gb_of_optimizer_state_stays_within_one_and_a_half_tensors(
    wide_checkpoint: Path, tmp_path: Path
) -> None:
    largest = max(s.numel for s in parameter_specs(SHAPE, tp=1, tp_rank=0)) * 4
    peak = _peak_rss_of_convert(wide_checkpoint, tmp_path / "out", "--include", "optimizer")
    assert (tmp_path / "out" / "optimizer" / "master.safetensors").exists()
    assert peak <= 1.5 * largest + 300 * MB, f"peak RSS {peak / MB:.0f} MB"


def test_tensor_parallel_merges_stream_within_the_same_bound(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint", SHAPE, dp=2, tp=2)
    largest = max(s.numel for s in parameter_specs(SHAPE, tp=1, tp_rank=0)) * 4
    peak = _peak_rss_of_convert(tmp_path / "checkpoint", tmp_path / "out")
    assert (tmp_path / "out" / "optimizer" / "master.safetensors").exists()
    assert peak <= 1.5 * largest + 300 * MB, f"peak RSS {peak / MB:.0f} MB"
