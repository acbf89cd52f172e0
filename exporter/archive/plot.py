"""Per-step plots of a tensor statistic from the Parquet index (matplotlib, no display needed).

Example (``neox-export plot archive --stat l2 --out dense_l2.png`` does the same):
    >>> from exporter import open_archive
    >>> from exporter.archive.plot import plot_statistic, statistic_series
    >>> archive = open_archive("archive")
    >>> [s.name for s in statistic_series(archive.index, "l2", "layers.*.attention.dense.weight")]
    ['gpt_neox.layers.0.attention.dense.weight', 'gpt_neox.layers.1.attention.dense.weight']
    >>> plot_statistic(archive.index, stat="l2", match="layers.*.attention.dense.weight",
    ...                out="dense_l2.png")
    PosixPath('dense_l2.png')
"""

from __future__ import annotations

import fnmatch
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from exporter.archive.text import plot_text
from exporter.errors import ArchiveError
from exporter.files import write_bytes_atomic
from exporter.records import STATISTICS

#: above this many lines a colour bar replaces the legend
MAX_LEGEND = 12


@dataclass(frozen=True)
class Series:
    """One tensor's statistic over the steps, ascending."""

    name: str
    layer: int | None
    steps: tuple[int, ...]
    values: tuple[float | None, ...]


def name_matches(name: str, pattern: str) -> bool:
    """Glob ``pattern`` against a whole tensor name or any dotted tail of it.

    ``layers.*.attention.dense.weight`` thus matches ``gpt_neox.layers.3.attention.dense.weight``.
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def statistic_series(index: pa.Table | ds.Dataset, stat: str, match: str,
                     kind: str = "model") -> list[Series]:
    """The ``stat`` column of every ``kind`` tensor whose name matches, one series per tensor.

    Series come in layer order (tensors outside blocks last), then by name.

    Raises:
        ArchiveError: unknown statistic, or no tensor matches.
    """
    if stat not in STATISTICS:
        raise ArchiveError(f"unknown statistic {stat!r}; choose from {', '.join(STATISTICS)}")
    columns = ["step", "name", "layer", stat]
    if isinstance(index, ds.Dataset):  # Archive.index: the kind filter is pushed down
        rows = index.to_table(filter=ds.field("kind") == kind, columns=columns)
    else:
        rows = index.filter(pc.equal(index["kind"], kind)).select(columns)
    by_name: dict[str, list[tuple[int, float | None]]] = {}
    layers: dict[str, int | None] = {}
    for row in rows.to_pylist():
        if name_matches(row["name"], match):
            by_name.setdefault(row["name"], []).append((row["step"], row[stat]))
            layers[row["name"]] = row["layer"]
    if not by_name:
        raise ArchiveError(f"no {kind} tensor matches {match!r}")
    series = []
    for name, points in by_name.items():
        points.sort()
        series.append(Series(name, layers[name], tuple(s for s, _ in points),
                             tuple(v for _, v in points)))
    series.sort(key=lambda s: (s.layer is None, s.layer or 0, s.name))
    return series


def legend_labels(series: list[Series]) -> list[str]:
    """One label per line: the tensor's name without the model prefix ``gpt_neox.`` (the four
    tensors of layer 0 that ``layers.0.*`` matches must not all read "layer 0"), drawn as
    text (archive names are not mathtext)."""
    return [plot_text(s.name.removeprefix("gpt_neox.")) for s in series]


#: Steps spanning this ratio or more (last / first positive step) are drawn on a log axis.
LOG_SPAN = 100


def log_steps(steps: list[int], logx: bool | None = None) -> bool:
    """Whether the step axis is logarithmic: ``logx``, or by default when the positive steps
    span two decades or more (Pythia's 0, 1, 2, 4 ... 512, 1000 ... 143000)."""
    if logx is not None:
        return logx
    positive = [step for step in steps if step > 0]
    return bool(positive) and max(positive) / min(positive) >= LOG_SPAN


def plot_statistic(index: pa.Table | ds.Dataset, *, stat: str = "l2",
                   match: str = "layers.*.attention.dense.weight", kind: str = "model",
                   out: str | os.PathLike[str], title: str | None = None,
                   logx: bool | None = None) -> Path:
    """Draw ``stat`` against the step for every matching tensor and write a PNG.

    The step axis is symmetric-logarithmic (linear below the first positive step, so step 0
    shows) when ``logx`` says so, by default when steps span orders of magnitude
    (:func:`log_steps`). Legends name the tensors (:func:`legend_labels`). The bytes depend
    only on the data (no timestamp).

    Args:
        index: the tensor index (``Archive.index``, or ``read_index(root / "index/tensors")``).
        stat: one of :data:`STATISTICS`.
        match: glob over tensor names (see :func:`name_matches`).
        kind: model, master, exp_avg, exp_avg_sq, buffer or state.
        out: the PNG to write.
        title: the plot title (a description of the selection when None).
        logx: logarithmic step axis; None decides from the steps.

    Returns:
        The path written.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    series = statistic_series(index, stat, match, kind)
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colormap = colormaps["viridis"]
    norm = Normalize(0, max(len(series) - 1, 1))
    steps = sorted({step for s in series for step in s.steps})
    marker = "o" if len(steps) <= 40 else None  # dots only while they stay apart
    for i, (s, label) in enumerate(zip(series, legend_labels(series), strict=True)):
        values = [float("nan") if v is None else v for v in s.values]
        axes.plot(s.steps, values, marker=marker, markersize=2.5, linewidth=1.2,
                  color=colormap(norm(i)), label=label)
    positive = [step for step in steps if step > 0]
    if log_steps(steps, logx):
        axes.set_xscale("symlog", linthresh=max(1, min(positive, default=1)))
    axes.set_xlabel("training step")
    axes.set_ylabel(stat)
    axes.grid(True, alpha=0.3)
    axes.set_title(plot_text(title or f"{stat} of {kind} {match} ({len(series)} tensors)"),
                   fontsize=10)
    if len(series) <= MAX_LEGEND:
        axes.legend(fontsize=7, ncols=2 if len(series) > 6 else 1)
    else:
        bar = figure.colorbar(ScalarMappable(norm, colormap), ax=axes)
        bar.set_label("tensor, in layer order")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    path = Path(out)
    write_bytes_atomic(path, buffer.getvalue())
    return path
