"""Compare two runs of a catalog tensor by tensor: per step and tensor, cosine similarity and
relative l2 distance (``||a - b|| / ||a||``, run A the reference).

Streaming: the pairs to compare come from the catalog's index (steps and tensors both runs
hold, same shape); tensors are read one pair at a time through each run's archive
(``Archive.tensor``), so memory holds one pair plus a float64 chunk
(:mod:`exporter.catalog.pairs`). The table goes into the catalog (``index/compare/``), where
its card links it.

Example (``neox-export compare catalog --runs seed1,seed2 --kind model``):
    >>> from exporter import open_catalog
    >>> from exporter.catalog.compare import compare_runs
    >>> result = compare_runs(open_catalog("catalog"), "seed1", "seed1")
    >>> import pyarrow.parquet as pq
    >>> table = pq.read_table(result.path)
    >>> set(table.column("l2_distance").to_pylist())
    {0.0}
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exporter.catalog.layout import compare_file
from exporter.catalog.pairs import pair_sums
from exporter.catalog.query import matching_names
from exporter.catalog.reader import Catalog
from exporter.catalog.schema import COMPARE_SCHEMA
from exporter.errors import CatalogError
from exporter.files import write_bytes_atomic

_PAIR_COLUMNS = ["step", "kind", "name", "layer", "numel", "shape", "data_offset_begin",
                 "data_offset_end"]


@dataclass(frozen=True)
class CompareResult:
    """Where the comparison went and what it covered."""

    path: Path
    rows: int
    steps: tuple[int, ...]


def comparable_pairs(catalog: Catalog, run_a: str, run_b: str, kind: str,
                     match: str | None = None, steps: Sequence[int] | None = None) -> pa.Table:
    """(step, name) pairs both runs index for ``kind``: step, name, layer, numel, bytes of A.

    Raises:
        CatalogError: the runs share nothing, or a shared tensor differs in shape.
    """
    sides = []
    for run in (run_a, run_b):
        table = catalog.tensors([run], columns=_PAIR_COLUMNS)
        table = table.filter(pc.equal(table["kind"], kind))
        if steps is not None:
            table = table.filter(pc.is_in(table["step"], pa.array(list(steps), pa.int64())))
        if match is not None:
            table = table.filter(pc.is_in(table["name"], matching_names(table["name"], match)))
        sides.append(table)
    shapes_b = {(r["step"], r["name"]): r["shape"]
                for r in sides[1].select(["step", "name", "shape"]).to_pylist()}
    rows = []
    for r in sides[0].select(["step", "name", "layer", "numel", "shape", "data_offset_begin",
                              "data_offset_end"]).to_pylist():
        shape_b = shapes_b.get((r["step"], r["name"]), None)
        if shape_b is None:
            continue
        if shape_b != r["shape"]:
            raise CatalogError(f"runs {run_a} and {run_b}: {r['name']} at step {r['step']} "
                               f"has shape {r['shape']} vs {shape_b}; compare runs of one "
                               "model size")
        rows.append({"step": r["step"], "name": r["name"], "layer": r["layer"],
                     "numel": r["numel"], "bytes": r["data_offset_end"] - r["data_offset_begin"]})
    if not rows:
        raise CatalogError(f"runs {run_a} and {run_b} share no {kind} tensor"
                           f"{f' matching {match!r}' if match else ''} at a common step")
    pairs = pa.Table.from_pylist(rows)
    return pairs.sort_by([("step", "ascending"), ("layer", "ascending"), ("name", "ascending")])


def compare_runs(catalog: Catalog, run_a: str, run_b: str, *, kind: str = "model",
                 match: str | None = None, steps: Sequence[int] | None = None,
                 out: str | os.PathLike[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> CompareResult:
    """Compare runs ``run_a`` and ``run_b`` of ``catalog`` and write the Parquet table.

    Args:
        catalog: an open catalog (:func:`exporter.open_catalog`).
        run_a, run_b: run names; A is the reference of the relative distance.
        kind: model, master, exp_avg, exp_avg_sq, buffer or state.
        match: glob over tensor names (all tensors when None).
        steps: steps to compare (every step both runs hold when None).
        out: the Parquet file; ``index/compare/{a}__{b}__{kind}.parquet`` in a local catalog.
        progress: called with the bytes of run A's tensor after each pair.

    Returns:
        The path written, its row count and the steps compared.
    """
    in_catalog = out is None
    if out is None:
        if catalog.root is None:
            raise CatalogError(f"{catalog.label}: a Hub catalog is read-only here; give the "
                               "comparison an --out file")
        out = catalog.root / compare_file(run_a, run_b, kind)
    pairs = comparable_pairs(catalog, run_a, run_b, kind, match, steps)
    archive_a, archive_b = catalog.run(run_a), catalog.run(run_b)
    rows = []
    for pair in pairs.to_pylist():
        step, name = pair["step"], pair["name"]
        sums = pair_sums(archive_a.tensor(step, name, kind), archive_b.tensor(step, name, kind),
                         f"{name} at step {step}")
        rows.append({"run_a": run_a, "run_b": run_b, "step": step, "kind": kind, "name": name,
                     "layer": pair["layer"], "numel": sums.numel, "l2_a": sums.l2_a,
                     "l2_b": sums.l2_b, "l2_distance": sums.distance,
                     "relative_l2": sums.relative, "cosine": sums.cosine})
        if progress is not None:
            progress(pair["bytes"])
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=COMPARE_SCHEMA), sink, compression="zstd")
    path = Path(out)
    write_bytes_atomic(path, sink.getvalue())
    if in_catalog and catalog.root is not None:
        from exporter.catalog.card import write_catalog_card

        write_catalog_card(catalog.root, redraw=False)  # the card links every comparison
    return CompareResult(path, len(rows), tuple(sorted({r["step"] for r in rows})))
