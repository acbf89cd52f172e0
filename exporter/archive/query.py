"""The tensor index as a query surface: a pyarrow Dataset, statistics, name globs.

``Archive.index`` is a :class:`pyarrow.dataset.Dataset` over the per-step shards
(``index/tensors/step{N}.parquet``, local or downloaded from the Hub), so a filter on
``step``, ``kind`` or ``name`` is pushed down to the Parquet reader (row-group statistics and
column projection) instead of materialising every row. Statistics come from the index alone:
:func:`statistics_table` reads no tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from exporter.archive.plot import STATISTICS, name_matches
from exporter.errors import ArchiveError


def index_dataset(shards: Sequence[pa.Table], label: str) -> ds.Dataset:
    """A dataset over validated index shards, in the order given (step order): filters and
    column selections run on it as on the Parquet files (``to_table(filter=...)``).

    Raises:
        ArchiveError: no shard.
    """
    if not shards:
        raise ArchiveError(f"{label}: no tensor index")
    return ds.dataset(pa.concat_tables(shards))


def select(index: ds.Dataset | pa.Table, *, kind: str | None = None,
           steps: Iterable[int] | None = None, names: Iterable[str] | None = None,
           columns: Sequence[str] | None = None) -> pa.Table:
    """Rows of the index with the given kind, steps and names (None: any), filter pushed down.

    Example:
        >>> import pyarrow as pa
        >>> index = pa.table({"step": [0, 0, 8], "kind": ["model", "master", "model"],
        ...                   "name": ["w", "w", "w"]})
        >>> select(index, kind="model", steps=[8]).to_pylist()
        [{'step': 8, 'kind': 'model', 'name': 'w'}]
    """
    conditions = []
    if kind is not None:
        conditions.append(ds.field("kind") == kind)
    if steps is not None:
        conditions.append(ds.field("step").isin(sorted(set(steps))))
    if names is not None:
        conditions.append(ds.field("name").isin(sorted(set(names))))
    condition = None
    for part in conditions:
        condition = part if condition is None else condition & part
    if isinstance(index, pa.Table):
        table = index.filter(condition) if condition is not None else index
        return table.select(list(columns)) if columns is not None else table
    return index.to_table(filter=condition, columns=list(columns) if columns is not None else None)


def matching_names(index: ds.Dataset | pa.Table, pattern: str, kind: str) -> list[str]:
    """Tensor names of ``kind`` equal to ``pattern``, or matching it as a glob or a dotted tail
    (``layers.*.attention.dense.weight``, ``layers.0.attention.dense.weight``), sorted."""
    names = pc.unique(select(index, kind=kind, columns=["name"])["name"]).to_pylist()
    if pattern in names:
        return [pattern]
    return sorted(n for n in names if name_matches(n, pattern))


def statistics_table(index: ds.Dataset | pa.Table, match: str, *, kind: str = "model",
                     stat: str | Sequence[str] = "l2", steps: Iterable[int] | None = None,
                     label: str = "archive") -> pa.Table:
    """Columns ``step``, ``name``, ``layer`` and the statistic(s) of every ``kind`` tensor
    whose name matches ``match``, by layer, name and step; only the index is read.

    Raises:
        ArchiveError: an unknown statistic, or no tensor matches.
    """
    stats = [stat] if isinstance(stat, str) else list(stat)
    unknown = [s for s in stats if s not in STATISTICS]
    if unknown or not stats:
        raise ArchiveError(f"unknown statistic {unknown[0] if unknown else stat!r}; choose "
                           f"from {', '.join(STATISTICS)}")
    names = matching_names(index, match, kind)
    if not names:
        raise ArchiveError(f"{label}: no {kind} tensor matches {match!r}")
    table = select(index, kind=kind, steps=steps, names=names,
                   columns=["step", "name", "layer", *stats])
    return table.sort_by([("layer", "ascending"), ("name", "ascending"), ("step", "ascending")])
