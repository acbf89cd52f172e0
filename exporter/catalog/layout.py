"""Every path inside a catalog; no other module spells one.

A catalog is a small dataset that indexes many run archives and holds no tensors. It reuses
the archive's folder names (:mod:`exporter.archive.layout`) where its tables mean the same,
with one shard per run instead of one per step:

    CATALOG/
      README.md                          dataset card: configs, the run table, plots
      catalog.json                       format version, tool, member runs
      index/runs.parquet                 one row per run: run, model_size, seed, variant,
                                         archive, revision, fingerprint ...
      index/tensors/{run}.parquet        the run's tensor index, run columns first
      index/checkpoints/{run}.parquet    the run's per-step table, run columns first
      index/compare/{a}__{b}__{kind}.parquet   ``compare``: per step and tensor, two runs
      assets/                            the card's plots
"""

from __future__ import annotations

import re
from pathlib import Path

from exporter.archive.layout import ASSETS_DIR, CARD, CHECKPOINT_INDEX_DIR, TENSOR_INDEX_DIR
from exporter.errors import CatalogError

MARKER = "catalog.json"
INDEX_DIR = TENSOR_INDEX_DIR.split("/")[0]
RUNS_TABLE = f"{INDEX_DIR}/runs.parquet"
RUN_TENSORS_DIR = TENSOR_INDEX_DIR
RUN_CHECKPOINTS_DIR = CHECKPOINT_INDEX_DIR
COMPARE_DIR = f"{INDEX_DIR}/compare"
CARD_FILE = CARD
PLOT_LINES = f"{ASSETS_DIR}/seeds_l2.png"
PLOT_BAND = f"{ASSETS_DIR}/seeds_l2_band.png"

# Run names become file names here and on the Hub: letters, digits, '.', '_', '-'.
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
COMPARE_SEPARATOR = "__"


def check_run_name(name: str) -> str:
    """``name`` if it can name a run (and its shard files); a CatalogError otherwise."""
    if not _RUN_NAME.match(name) or COMPARE_SEPARATOR in name or name.endswith(".parquet"):
        raise CatalogError(
            f"run name {name!r}: use letters, digits, '.', '_' and '-' (no '__'), at most 100 "
            f"characters; rename it with --run {name}=run=NEW-NAME")
    return name


def run_tensors_file(run: str) -> str:
    return f"{RUN_TENSORS_DIR}/{check_run_name(run)}.parquet"


def run_checkpoints_file(run: str) -> str:
    return f"{RUN_CHECKPOINTS_DIR}/{check_run_name(run)}.parquet"


def compare_file(run_a: str, run_b: str, kind: str) -> str:
    return (f"{COMPARE_DIR}/{check_run_name(run_a)}{COMPARE_SEPARATOR}"
            f"{check_run_name(run_b)}{COMPARE_SEPARATOR}{kind}.parquet")


def table_glob(folder: str) -> str:
    """The glob over one table's shards (the card's ``data_files``)."""
    return f"{folder}/*.parquet"


def marker_path(root: Path) -> Path:
    return root / MARKER


def is_catalog(root: Path) -> bool:
    """Whether the folder ``root`` holds a catalog (its ``catalog.json``)."""
    return marker_path(root).is_file()
