"""Cross-run plots of a statistic from a catalog's index: one line per run, or the mean and
min-max band across runs, against the training step on a log axis.

A run's value at a step is the mean of ``stat`` over the tensors that ``match`` selects (one
tensor, when the glob names one). With ``band=True`` runs are put in families that agree on
every metadata column but ``group_by`` (model size and variant, when grouping by seed), and each
family gets its mean line and min-max band across the ``group_by`` values: PolyPythias' picture
of how much seeds disagree.

Example (``neox-export plot catalog --stat l2 --group-by seed --band --out band.png``):
    >>> from exporter import open_catalog
    >>> from exporter.catalog.plot import plot_runs
    >>> plot_runs(open_catalog("catalog"), stat="l2", match="layers.0.attention.dense.weight",
    ...           band=True, out="band.png")
    PosixPath('band.png')
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from exporter.catalog import GROUP_BY
from exporter.errors import CatalogError
from exporter.files import write_bytes_atomic

if TYPE_CHECKING:
    from exporter.catalog.reader import Catalog

#: Metadata a plot may group runs by.
FAMILY_COLUMNS = ("model_size", "variant", "seed")


@dataclass(frozen=True)
class RunCurve:
    """One run's statistic per step (the mean over the matched tensors)."""

    run: str
    metadata: dict[str, object]
    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Band:
    """A family of runs: per step, the mean, min and max across its runs."""

    label: str
    runs: tuple[str, ...]
    steps: tuple[int, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


def run_curves(stats: pa.Table, stat: str) -> list[RunCurve]:
    """Per run and step, the mean of ``stat`` over the rows of a ``Catalog.stats`` answer."""
    if not stats.num_rows:
        raise CatalogError("no tensor matches: nothing to plot")
    means = stats.group_by(["run", "step"]).aggregate([(stat, "mean")]).sort_by(
        [("run", "ascending"), ("step", "ascending")])
    meta = {r["run"]: {c: r[c] for c in ("model_size", "seed", "variant")}
            for r in stats.select(["run", "model_size", "seed", "variant"]).to_pylist()}
    points: dict[str, list[tuple[int, float]]] = {}
    for row in means.to_pylist():
        value = row[f"{stat}_mean"]
        points.setdefault(row["run"], []).append((row["step"], float("nan") if value is None else value))
    return [RunCurve(run, meta[run], tuple(s for s, _ in p), tuple(v for _, v in p))
            for run, p in points.items()]


def bands(curves: Sequence[RunCurve], group_by: str) -> list[Band]:
    """Families of runs that agree on every metadata column but ``group_by``, each with its
    mean and min-max band over the steps all its runs share."""
    families: dict[tuple[object, ...], list[RunCurve]] = {}
    keys = [c for c in FAMILY_COLUMNS if c != group_by]
    for curve in curves:
        key = () if group_by == "run" else tuple(curve.metadata[c] for c in keys)
        families.setdefault(key, []).append(curve)
    out = []
    for key, members in families.items():
        steps = sorted(set.intersection(*(set(c.steps) for c in members)))
        columns = [[dict(zip(c.steps, c.values, strict=True))[s] for c in members] for s in steps]
        label = " ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True) if v is not None)
        out.append(Band(label or "all runs", tuple(c.run for c in members), tuple(steps),
                        tuple(sum(v) / len(v) for v in columns), tuple(min(v) for v in columns),
                        tuple(max(v) for v in columns)))
    return out


def plot_runs(catalog: Catalog, *, stat: str = "l2",
              match: str = "layers.*.attention.dense.weight", kind: str = "model",
              group_by: str = "seed", band: bool = False, runs: Sequence[str] | None = None,
              out: str | os.PathLike[str], title: str | None = None) -> Path:
    """Draw ``stat`` per step for the catalog's runs and write a PNG (bytes depend only on the
    data).

    Args:
        catalog: an open catalog (:func:`exporter.open_catalog`).
        stat, match, kind: what to draw, as :meth:`Catalog.stats` takes them.
        group_by: the column that labels lines (``seed``, ``run``, ``variant``,
            ``model_size``); with ``band`` the one the band spans.
        band: draw each family's mean and min-max band instead of one line per run.
        runs: runs to draw (all when None).
        out: the PNG to write.
        title: the plot title (a description of the selection when None).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if group_by not in GROUP_BY:
        raise CatalogError(f"--group-by {group_by!r}: choose from {', '.join(GROUP_BY)}")
    stats = catalog.stats(match, kind, stat, runs=runs)
    if not stats.num_rows:
        raise CatalogError(f"{catalog.label}: no {kind} tensor matches {match!r} (try a glob "
                           "such as 'layers.*.attention.dense.weight')")
    curves = run_curves(stats, stat)
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colormap = colormaps["tab10"]
    steps = sorted({s for c in curves for s in c.steps})
    if band:
        for i, b in enumerate(bands(curves, group_by)):
            colour = colormap(i % 10)
            axes.fill_between(b.steps, b.low, b.high, color=colour, alpha=0.25, linewidth=0)
            axes.plot(b.steps, b.mean, color=colour, linewidth=1.4,
                      label=f"{b.label}: mean, min-max of {len(b.runs)} runs")
    else:
        for i, c in enumerate(sorted(curves, key=lambda c: (str(c.metadata.get(group_by)), c.run))):
            value = c.run if group_by == "run" else f"{group_by}={c.metadata.get(group_by)}"
            axes.plot(c.steps, c.values, color=colormap(i % 10), linewidth=1.2,
                      marker="o" if len(steps) <= 40 else None, markersize=2.5,
                      label=value if group_by == "run" else f"{value} ({c.run})")
    positive = [s for s in steps if s > 0]
    if positive:
        # A log-step axis, as training-dynamics plots use; symlog keeps step 0 on it
        # (Pythia: 0, 1, 2, 4 ... 512, 1000 ... 143000).
        axes.set_xscale("symlog", linthresh=max(1, positive[0]))
    axes.set_xlabel("training step")
    axes.set_ylabel(stat)
    axes.grid(True, alpha=0.3)
    axes.set_title(title or f"{stat} of {kind} {match} (mean over matching tensors), "
                   f"{len(curves)} runs", fontsize=10)
    axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    path = Path(out)
    write_bytes_atomic(path, buffer.getvalue())
    return path
