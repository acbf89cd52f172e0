"""Step-to-step change of every tensor of an archive: the quantity training-dynamics papers plot.

For each pair of consecutive completed steps (``p``, ``s``) and each tensor both hold:
``update_l2 = ||w_s - w_p||``, ``weight_l2 = ||w_p||`` (the weight the update was applied to)
and ``ratio = update_l2 / weight_l2`` (None for a zero weight). One shard per step pair,
``index/deltas/step{s}.parquet`` in the archive (:data:`exporter.catalog.schema.DELTA_SCHEMA`).

Two steps at a time: tensors are read one pair at a time through ``Archive.tensor`` and summed
in float64 chunks (:mod:`exporter.catalog.pairs`). Incremental: rows a shard already holds for
the same previous step, newer than both steps' index shards, are kept, and only the tensors
asked for that it lacks are computed (a later ``--kind`` or ``--match`` adds to it).

Example (``neox-export deltas archive``; an archive of steps 0, 1, 2, 4):
    >>> from exporter.catalog.deltas import compute_deltas
    >>> result = compute_deltas("archive")
    >>> result.written
    [1, 2, 4]
    >>> compute_deltas("archive").written
    []
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exporter.archive.layout import delta_index_path, is_archive, tensor_index_path
from exporter.archive.loader import open_archive
from exporter.catalog.pairs import pair_sums
from exporter.catalog.query import matching_names
from exporter.catalog.schema import DELTA_SCHEMA
from exporter.errors import CatalogError
from exporter.files import write_bytes_atomic
from exporter.records import KINDS


@dataclass
class DeltaResult:
    """Steps whose shard was written, steps whose shard was kept, and the rows computed."""

    root: Path
    written: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    rows: int = 0


def _kept_rows(path: Path, previous: int, sources: Sequence[Path]) -> list[dict[str, Any]]:
    """Rows of the shard at ``path`` that still hold: none if it is missing, was computed from
    another previous step, or is older than either step's index shard (a rebuilt step)."""
    if not path.is_file():
        return []
    if any(s.is_file() and s.stat().st_mtime_ns > path.stat().st_mtime_ns for s in sources):
        return []
    rows = pq.read_table(path).to_pylist()
    return rows if all(r["previous_step"] == previous for r in rows) else []


def _order(row: dict[str, Any]) -> tuple[str, bool, int, str]:
    return (row["kind"], row["layer"] is None, row["layer"] or 0, row["name"])


def compute_deltas(archive: str | os.PathLike[str], *, kinds: Sequence[str] = ("model",),
                   match: str | None = None,
                   progress: Callable[[int], None] | None = None) -> DeltaResult:
    """Write the step-to-step change of every ``kinds`` tensor into the archive folder.

    Args:
        archive: a local archive folder (``neox-export build --out``).
        kinds: tensor kinds to cover (``model``; ``master`` for the fp32 weights).
        match: glob over tensor names (every tensor when None).
        progress: called with the bytes of the later step's tensor after each pair.

    Raises:
        CatalogError: not a local archive, or fewer than two completed steps.
    """
    root = Path(archive)
    if not is_archive(root):
        raise CatalogError(f"{archive}: not a local archive folder (deltas are written into it; "
                           "for a Hub archive, download it or build it locally first)")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise CatalogError(f"--kind {unknown[0]!r}: choose from {', '.join(KINDS)}")
    opened = open_archive(root)
    steps = opened.steps
    if len(steps) < 2:
        raise CatalogError(f"{root}: deltas need two completed steps, the archive has {steps}")
    index = opened.index.to_table(columns=["step", "kind", "name", "layer", "data_offset_begin",
                                           "data_offset_end"])
    selected = index.filter(pc.is_in(index["kind"], pa.array(list(kinds), pa.string())))
    names = set((matching_names(selected["name"], match) if match is not None
                 else pc.unique(selected["name"])).to_pylist())
    by_step: dict[int, dict[tuple[str, str], dict[str, Any]]] = {}
    for row in index.to_pylist():
        by_step.setdefault(row["step"], {})[(row["kind"], row["name"])] = row
    result = DeltaResult(root)
    for previous, step in zip(steps, steps[1:], strict=False):
        path = delta_index_path(root, step)
        before, after = by_step.get(previous, {}), by_step.get(step, {})
        common = set(before) & set(after)
        wanted = {key for key in common if key[0] in kinds and key[1] in names}
        # Rows already computed for this pair stay (another --kind or --match asked for them).
        rows = [r for r in _kept_rows(path, previous, [tensor_index_path(root, previous),
                                                       tensor_index_path(root, step)])
                if (r["kind"], r["name"]) in common]
        todo = wanted - {(r["kind"], r["name"]) for r in rows}
        if not todo:
            result.kept.append(step)
            continue
        for kind, name in sorted(todo, key=lambda k: _order({**after[k], "kind": k[0]})):
            sums = pair_sums(opened.tensor(previous, name, kind), opened.tensor(step, name, kind),
                             f"{name} ({kind}) from step {previous} to {step}")
            rows.append({"step": step, "previous_step": previous, "kind": kind, "name": name,
                         "layer": after[(kind, name)]["layer"], "numel": sums.numel,
                         "update_l2": sums.distance, "weight_l2": sums.l2_a,
                         "ratio": sums.distance / sums.l2_a if sums.aa > 0 else None})
            if progress is not None:
                row = after[(kind, name)]
                progress(row["data_offset_end"] - row["data_offset_begin"])
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(sorted(rows, key=_order), schema=DELTA_SCHEMA), sink,
                       compression="zstd")
        write_bytes_atomic(path, sink.getvalue())
        result.written.append(step)
        result.rows += len(todo)
    return result
