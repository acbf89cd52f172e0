"""Planning pays only for what a checkpoint needs: a tree is walked for numpy records only when
its pickle names numpy, and the records of a plan stay out of the garbage collector's walks
while its files are written, with the collector as it was afterwards."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import exporter.torchfile as torchfile
from exporter.pipeline import export as export_module
from exporter.pipeline.export import ExportOptions, export_checkpoint
from exporter.samples import TINY, RunConfig, write_checkpoint


def test_trees_are_walked_for_numpy_only_when_the_pickle_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    walked: list[object] = []
    real = torchfile.resolve_numpy

    def spy(obj: object) -> object:
        walked.append(obj)
        return real(obj)

    monkeypatch.setattr(torchfile, "resolve_numpy", spy)
    torch.save({"w": torch.ones(3), "steps": [1, 2, 3]}, tmp_path / "plain.pt")
    torch.save({"w": torch.ones(3), "rng": np.arange(4, dtype=np.uint32)}, tmp_path / "np.pt")
    plain = torchfile.load_torch_file(tmp_path / "plain.pt")
    assert walked == [] and plain.obj["steps"] == [1, 2, 3]
    with_numpy = torchfile.load_torch_file(tmp_path / "np.pt")
    assert len(walked) == 1
    assert isinstance(with_numpy.obj["rng"], np.ndarray)
    assert with_numpy.obj["rng"].tolist() == [0, 1, 2, 3]


def test_the_plan_is_kept_out_of_collections_while_its_files_are_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_checkpoint(tmp_path / "src", TINY, step=8, dp=2, config=RunConfig(max_elements_per_comm=64))
    frozen_while_writing: list[int] = []
    real = export_module._write_rest

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        frozen_while_writing.append(gc.get_freeze_count())
        return real(*args, **kwargs)

    monkeypatch.setattr(export_module, "_write_rest", spy)
    before = gc.get_freeze_count()
    assert gc.isenabled()
    export_checkpoint(tmp_path / "src", tmp_path / "out", ExportOptions())
    assert frozen_while_writing and frozen_while_writing[0] > before
    assert gc.get_freeze_count() == before and gc.isenabled()


def test_a_failed_plan_leaves_the_collector_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_checkpoint(tmp_path / "src", TINY, step=8, dp=2)
    real = export_module.plan_optimizer

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        real(*args, **kwargs)
        raise RuntimeError("stop after planning")

    monkeypatch.setattr(export_module, "plan_optimizer", failing)
    before = gc.get_freeze_count()
    with pytest.raises(RuntimeError, match="stop after planning"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", ExportOptions())
    assert gc.get_freeze_count() == before and gc.isenabled()


def test_the_optimizer_files_start_while_the_model_files_are_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.convert.stream import Converter

    write_checkpoint(tmp_path / "src", TINY, step=8, dp=2)
    real = Converter.write_files
    optimizer_started = threading.Event()
    overlapped: list[bool] = []

    def spy(self, tasks, root, cancel=None):  # type: ignore[no-untyped-def]
        if any(task.path.name == "model.safetensors" for task in tasks):
            overlapped.append(optimizer_started.wait(10))
        elif any(task.path.name == "master.safetensors" for task in tasks):
            optimizer_started.set()
        return real(self, tasks, root, cancel)

    monkeypatch.setattr(Converter, "write_files", spy)
    result = export_checkpoint(tmp_path / "src", tmp_path / "out", ExportOptions())
    assert overlapped == [True]
    kinds = [r.job.kind for r in result.records]
    assert kinds.index("model") < kinds.index("master")  # records keep the file order


def test_a_failing_model_file_reports_its_own_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.convert.stream import Converter
    from exporter.errors import ExporterError

    write_checkpoint(tmp_path / "src", TINY, step=8, dp=2)
    real = Converter._write_one

    def failing(self, task, root, cancel):  # type: ignore[no-untyped-def]
        if task.path.name == "model.safetensors":
            raise ExporterError("disk full while writing the model")
        return real(self, task, root, cancel)

    monkeypatch.setattr(Converter, "_write_one", failing)
    with pytest.raises(ExporterError, match="disk full while writing the model"):
        export_checkpoint(tmp_path / "src", tmp_path / "out", ExportOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
