"""Many runs side by side: a catalog indexes many run archives (PolyPythias seeds, say), answers
cross-run statistics from its own index, compares runs tensor by tensor, and computes each
archive's step-to-step change.

- :func:`build_catalog`: add archives to a catalog (incremental);
- :func:`open_catalog`: read one: ``.runs``, ``.stats(...)``, ``.run(name)``;
- :func:`compare_runs`: per step and tensor, cosine and relative l2 distance of two runs;
- :func:`compute_deltas`: per tensor and step pair, the l2 of the update and its ratio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.catalog.build import CatalogUpdate, build_catalog
    from exporter.catalog.compare import CompareResult, compare_runs
    from exporter.catalog.deltas import DeltaResult, compute_deltas
    from exporter.catalog.reader import Catalog, open_catalog

# Imported on first use (PEP 562): the command line takes GROUP_BY from here, and the
# readers below bring torch and pyarrow.dataset with them.
_HOME = {"CatalogUpdate": "build", "build_catalog": "build", "CompareResult": "compare",
         "compare_runs": "compare", "DeltaResult": "deltas", "compute_deltas": "deltas",
         "Catalog": "reader", "open_catalog": "reader"}

#: What a cross-run plot may draw one line per (``neox-export plot --group-by``).
GROUP_BY = ("seed", "run", "variant", "model_size")

__all__ = ["Catalog", "CatalogUpdate", "CompareResult", "DeltaResult", "build_catalog",
           "compare_runs", "compute_deltas", "open_catalog"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
