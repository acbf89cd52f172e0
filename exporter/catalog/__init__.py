"""Many runs side by side: a catalog indexes many run archives (PolyPythias seeds, say), answers
cross-run statistics from its own index, compares runs tensor by tensor, and computes each
archive's step-to-step change.

- :func:`build_catalog`: add archives to a catalog (incremental);
- :func:`open_catalog`: read one: ``.runs``, ``.stats(...)``, ``.run(name)``;
- :func:`compare_runs`: per step and tensor, cosine and relative l2 distance of two runs;
- :func:`compute_deltas`: per tensor and step pair, the l2 of the update and its ratio.
"""

from exporter.catalog.build import CatalogUpdate, build_catalog
from exporter.catalog.compare import CompareResult, compare_runs
from exporter.catalog.deltas import DeltaResult, compute_deltas
from exporter.catalog.reader import Catalog, open_catalog

__all__ = ["Catalog", "CatalogUpdate", "CompareResult", "DeltaResult", "build_catalog",
           "compare_runs", "compute_deltas", "open_catalog"]
