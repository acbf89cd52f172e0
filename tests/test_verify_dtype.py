"""`verify` of exports written with `--dtype`: the master weight cast to the source dtype is the
source weight, and the written weight is that value cast once more, so an honest export passes
and a tampered one still fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.pipeline.export import ExportOptions, export_checkpoint
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource
from exporter.verify import verify_path

CASES = [  # (source dtype, --dtype)
    (torch.float16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.float32),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[torch.dtype, Path]:
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        folder = tmp_path_factory.mktemp(f"run-{dtype}".replace("torch.", ""))
        write_run(folder, TINY, steps=(0, 8), dp=2, dtype=dtype, config=tiny_run_config(8))
        out[dtype] = folder
    return out


@pytest.mark.parametrize(("source", "dtype"), CASES, ids=lambda d: str(d).removeprefix("torch."))
def test_archive_built_with_dtype_verifies(runs, tmp_path: Path, source, dtype) -> None:
    out = tmp_path / "a"
    build(LocalSource(runs[source]), out,
          BuildOptions(export=ExportOptions(dtype=dtype), quiet=True))
    reports = verify_path(out)
    assert [r.target.name for r in reports] == ["step0", "step8"]
    for report in reports:
        assert report.ok, report.text()
        invariant = next(c for c in report.checks if c.name == "master->model")
        assert invariant.passed == 28


@pytest.mark.parametrize(("source", "dtype"), CASES[:1] + CASES[2:3],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_lone_step_folder_converted_with_dtype_verifies(runs, tmp_path: Path, source, dtype) -> None:
    export_checkpoint(runs[source] / "step8", tmp_path / "step8", ExportOptions(dtype=dtype))
    report = verify_path(tmp_path / "step8")[0]
    assert report.ok, report.text()


def test_dtype_export_with_a_wrong_weight_still_fails(runs, tmp_path: Path) -> None:
    """The check stays a check: a weight cast straight from the master (skipping the source
    dtype) differs from the honest double cast and is reported."""
    step = tmp_path / "step8"
    export_checkpoint(runs[torch.float16] / "step8", step, ExportOptions(dtype=torch.bfloat16))
    model_file = step / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as f:
        metadata = f.metadata()
    weights = load_file(model_file)
    master = load_file(step / "optimizer" / "master.safetensors")
    name = "gpt_neox.layers.0.attention.dense.weight"
    weights[name] = master[name].to(torch.bfloat16)
    assert not torch.equal(weights[name], master[name].half().bfloat16())
    save_file(weights, model_file, metadata=metadata)
    report = verify_path(step)[0]
    invariant = next(c for c in report.checks if c.name == "master->model")
    assert [f.split(":")[0] for f in invariant.failures] == [name]
    assert "float16 then bfloat16" in invariant.failures[0]
