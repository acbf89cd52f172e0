"""Plots: legends name each tensor, and the step axis is logarithmic for log-spaced steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pytest
from cli_helpers import run_cli, tiny_run
from matplotlib.figure import Figure

from exporter.archive.plot import plot_statistic

LAYER0 = ["gpt_neox.layers.0.attention.dense.weight", "gpt_neox.layers.0.attention.dense.bias",
          "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]
PYTHIA_STEPS = [0, 1, 2, 4, 8, 16, 512, 1000, 2000, 143000]


def _index(names: list[str], steps: list[int]) -> pa.Table:
    """The index columns a plot reads: one row per tensor and step."""
    rows = [{"step": step, "name": name, "layer": 0, "kind": "model", "l2": float(i + step)}
            for i, name in enumerate(names) for step in steps]
    return pa.Table.from_pylist(rows)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the plot code saves, for its axes and legend."""
    figures: list[Figure] = []
    original = Figure.savefig

    def savefig(self: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def _legend(figure: Figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_legend_names_each_tensor_not_only_its_layer(drawn: list[Figure], tmp_path: Path) -> None:
    plot_statistic(_index(LAYER0, [0, 1, 2]), match="layers.0.*", out=tmp_path / "p.png")
    labels = _legend(drawn[0])
    assert len(set(labels)) == 4
    assert "layers.0.attention.dense.weight" in labels
    assert "layers.0.mlp.dense_h_to_4h.weight" in labels


def test_log_spaced_steps_get_a_log_axis_by_default(drawn: list[Figure], tmp_path: Path) -> None:
    plot_statistic(_index(LAYER0[:1], PYTHIA_STEPS), match="*", out=tmp_path / "a.png")
    plot_statistic(_index(LAYER0[:1], [1000, 2000, 3000]), match="*", out=tmp_path / "b.png")
    assert drawn[0].axes[0].get_xscale() == "symlog"
    assert drawn[1].axes[0].get_xscale() == "linear"


def test_logx_forces_the_axis_either_way(drawn: list[Figure], tmp_path: Path) -> None:
    plot_statistic(_index(LAYER0[:1], [0, 1, 2, 4, 8]), match="*", out=tmp_path / "a.png", logx=True)
    plot_statistic(_index(LAYER0[:1], PYTHIA_STEPS), match="*", out=tmp_path / "b.png", logx=False)
    assert drawn[0].axes[0].get_xscale() == "symlog"
    assert drawn[1].axes[0].get_xscale() == "linear"


def test_plot_command_takes_logx(drawn: list[Figure], tmp_path: Path,
                                 tmp_path_factory: pytest.TempPathFactory,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from exporter import BuildOptions, ExportOptions, build, open_source

    root = tmp_path / "archive"
    build(open_source(str(tiny_run(tmp_path_factory, (0, 1, 2, 4)))), root,
          BuildOptions(export=ExportOptions(include=("model",)), quiet=True))
    ran = run_cli(capsys, "plot", root, "--match", "layers.0.attention.*", "--logx", "--out", tmp_path / "p.png")
    assert ran.code == 0, ran.err
    assert drawn[-1].axes[0].get_xscale() == "symlog"
    assert len(set(_legend(drawn[-1]))) == 4
    ran = run_cli(capsys, "plot", root, "--match", "layers.0.attention.*", "--no-logx", "--out", tmp_path / "p.png")
    assert ran.code == 0, ran.err
    assert drawn[-1].axes[0].get_xscale() == "linear"
