"""Index-only queries: a statistic of matching tensors, from Parquet, no tensor read.

:func:`index_stats` is the one place that answers "``stat`` of the ``kind`` tensors matching
``match``" from an index table; the catalog answers cross-run queries with it over its own
shards, and it is meant to hand over to the archive's own ``Archive.stats`` once the loader
has one (same arguments, same rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from exporter.archive.plot import STATISTICS, name_matches
from exporter.errors import CatalogError

#: Columns of a stats answer after any run columns the index carries.
STATS_COLUMNS = ("step", "kind", "name", "layer")


def matching_names(names: pa.Array | pa.ChunkedArray, match: str) -> pa.Array:
    """The distinct names that ``match`` selects (a glob over a name or any dotted tail of
    it, :func:`exporter.archive.plot.name_matches`), tested once per distinct name."""
    distinct = pc.unique(names).to_pylist()
    return pa.array([n for n in distinct if name_matches(n, match)], pa.string())


def index_stats(index: pa.Table, match: str, kind: str = "model", stat: str = "l2",
                steps: Sequence[int] | None = None, lead: Sequence[str] = ()) -> pa.Table:
    """Rows of ``index`` for ``kind`` tensors whose name matches: ``lead`` columns, then step,
    kind, name, layer and ``stat``, in the index's order.

    Raises:
        CatalogError: an unknown statistic.
    """
    if stat not in STATISTICS:
        raise CatalogError(f"unknown statistic {stat!r}; choose from {', '.join(STATISTICS)}")
    table = index.filter(pc.equal(index["kind"], kind))
    if steps is not None:
        table = table.filter(pc.is_in(table["step"], pa.array(list(steps), pa.int64())))
    table = table.filter(pc.is_in(table["name"], matching_names(table["name"], match)))
    return table.select([*lead, *STATS_COLUMNS, stat])
