"""``verify`` of a source checkpoint compares each master weight with its model weight a piece
at a time (``COMPARE_ELEMENTS``): no parameter is read whole, and a difference is counted over
the whole tensor, as one comparison of the whole tensors counts it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter import verify
from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.zero.common import ParamSlices
from exporter.samples import TINY, RunConfig, write_checkpoint
from exporter.torchfile import TensorRef, load_torch_file


def _checkpoint(tmp_path: Path) -> Path:
    write_checkpoint(tmp_path / "ck", TINY, step=8, dp=2, config=RunConfig(max_elements_per_comm=64))
    return tmp_path / "ck"


def test_no_parameter_is_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _checkpoint(tmp_path)
    monkeypatch.setattr(verify, "COMPARE_ELEMENTS", 7)
    counts: list[int] = []
    param_range, tensor_range = ParamSlices.read_range, TensorRef.read_range

    def param_read_range(self: ParamSlices, kind: str, start: int, count: int) -> np.ndarray:
        counts.append(count)
        return param_range(self, kind, start, count)

    def tensor_read_range(self: TensorRef, start: int, count: int) -> np.ndarray:
        counts.append(count)
        return tensor_range(self, start, count)

    def whole(*_: object) -> None:
        raise AssertionError("a parameter read whole")

    monkeypatch.setattr(ParamSlices, "read_range", param_read_range)
    monkeypatch.setattr(TensorRef, "read_range", tensor_read_range)
    monkeypatch.setattr(ParamSlices, "read", whole)
    (report,) = verify.verify_path(folder)
    invariant = next(c for c in report.checks if c.name == "master->model")
    assert invariant.failures == [] and invariant.passed > 10
    assert counts and max(counts) == 7


def _model_weight(folder: Path) -> tuple[Path, TensorRef]:
    """The largest model weight of the first layer file: its file and its record."""
    files = scan_checkpoint(folder)
    path = files.layer_files[min(files.layer_files)]
    refs = [(ref.numel, key, ref) for key, ref in load_torch_file(path).tensors()]
    _, _, ref = max(refs, key=lambda r: r[0])
    return path, ref


def test_a_difference_is_counted_over_the_whole_tensor(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _checkpoint(tmp_path)
    path, ref = _model_weight(folder)
    assert ref.numel > 40 and ref.element_size == 2
    # Three elements changed, in three different pieces of 7.
    with open(path, "r+b") as fh:
        for element in (1, 20, ref.numel - 1):
            fh.seek(ref.file_offset + element * 2)
            value = fh.read(2)
            fh.seek(ref.file_offset + element * 2)
            fh.write(bytes([value[0] ^ 0x01, value[1]]))
    whole = verify.verify_path(folder)[0]
    monkeypatch.setattr(verify, "COMPARE_ELEMENTS", 7)
    pieces = verify.verify_path(folder)[0]
    failures = [next(c for c in r.checks if c.name == "master->model").failures
                for r in (whole, pieces)]
    assert failures[0] == failures[1]
    assert len(failures[0]) == 1 and f"differs from the model weight in 3 of {ref.numel} elements" in failures[0][0]


def test_an_export_s_model_weights_are_read_one_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each model weight is read when its master is compared, not all of a step's at once.
    from exporter.pipeline.export import ExportOptions, export_checkpoint

    export_checkpoint(_checkpoint(tmp_path), tmp_path / "out", ExportOptions())
    reads: list[tuple[str, str]] = []
    real = verify.safe_open

    class Spy:
        def __init__(self, path: str, **kwargs: object) -> None:
            self.name, self.opened = Path(path).name, real(path, **kwargs)

        def __enter__(self) -> Spy:
            self.handle = self.opened.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.opened.__exit__(*exc)

        def get_tensor(self, key: str) -> object:
            reads.append((self.name, key))
            return self.handle.get_tensor(key)

        def metadata(self) -> object:
            return self.handle.metadata()

    monkeypatch.setattr(verify, "safe_open", Spy)
    (report,) = verify.verify_path(tmp_path / "out")
    assert report.ok, report.text()
    models = [key for name, key in reads if name.startswith("model")]
    masters = [key for name, key in reads if not name.startswith("model")]
    assert masters and len(models) == len(masters)
    # master, then its model weight, then the next master ...
    assert reads[1::2] == [(reads[1][0], key) for key in masters] and \
        [key for _, key in reads[0::2]] == masters
