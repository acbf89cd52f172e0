"""Read a catalog: its runs, cross-run statistics from its own index, and each run's archive.

Example (a catalog of three seeds of the tiny sample run, steps 0, 1, 2, 4):
    >>> from exporter import open_catalog
    >>> catalog = open_catalog("catalog")
    >>> catalog.runs.column("run").to_pylist(), catalog.runs.column("seed").to_pylist()
    (['seed1', 'seed2', 'seed3'], [1, 2, 3])
    >>> table = catalog.stats("layers.0.attention.dense.weight", stat="l2", steps=[4])
    >>> table.column("run").to_pylist()
    ['seed1', 'seed2', 'seed3']
    >>> w = catalog.run("seed2").tensor(4, "gpt_neox.layers.0.attention.dense.weight")
    >>> tuple(w.shape)
    (32, 32)

Statistics never touch the member archives: a member that cannot be reached still answers from
the rows indexed for it; :meth:`Catalog.unreachable` names such runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from exporter.archive.loader import Archive
from exporter.archive.plot import STATISTICS
from exporter.catalog.layout import (
    MARKER,
    RUNS_TABLE,
    is_catalog,
    run_checkpoints_file,
    run_tensors_file,
)
from exporter.catalog.members import HUB_PREFIX, MemberRef, open_member, reachable
from exporter.catalog.query import STATS_COLUMNS, index_stats
from exporter.catalog.schema import (
    CATALOG_CHECKPOINT_SCHEMA,
    CATALOG_TENSOR_SCHEMA,
    RUN_COLUMNS,
)
from exporter.errors import CatalogError, ExporterError
from exporter.hub.calls import RetryPolicy, hub_call


class _CatalogFiles:
    """Files of a catalog: a local folder, or Hub downloads on demand (cached by the client)."""

    def __init__(self, root: Path | None = None, repo_id: str | None = None,
                 revision: str | None = None, retry: RetryPolicy | None = None) -> None:
        self.root = root
        self.repo_id = repo_id
        self.revision = revision
        self.retry = retry or RetryPolicy(attempts=3, base_delay=1.0)

    def path(self, relative: str) -> Path:
        if self.root is not None:
            path = self.root / relative
            if not path.is_file():
                raise CatalogError(f"{self.root}: missing {relative}")
            return path
        from huggingface_hub import hf_hub_download

        repo_id = self.repo_id or ""
        return Path(hub_call(lambda: hf_hub_download(repo_id, relative, repo_type="dataset",
                                                     revision=self.revision),
                             what=f"download {relative} of catalog {repo_id}", repo_id=repo_id,
                             policy=self.retry, error=CatalogError))


class Catalog:
    """Many run archives side by side. Open one with :func:`open_catalog`."""

    def __init__(self, files: _CatalogFiles, label: str) -> None:
        self._files = files
        self.label = label
        self._archives: dict[str, Archive] = {}

    def __repr__(self) -> str:
        return f"Catalog({self.label!r}, runs={self.run_names})"

    @property
    def root(self) -> Path | None:
        """The catalog's local folder (None for a catalog read from the Hub)."""
        return self._files.root

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """``catalog.json``: format version, tool, member runs and their overrides."""
        return json.loads(self._files.path(MARKER).read_text(encoding="utf-8"))

    @cached_property
    def runs(self) -> pa.Table:
        """One row per run: run, model_size, seed, variant, archive, revision, steps ..."""
        return pq.read_table(self._files.path(RUNS_TABLE))

    @property
    def run_names(self) -> list[str]:
        return self.runs.column("run").to_pylist()

    def _row(self, name: str) -> dict[str, Any]:
        for row in self.runs.to_pylist():
            if row["run"] == name:
                return row
        raise CatalogError(f"{self.label}: no run {name!r} (runs: {', '.join(self.run_names)})")

    def _selected(self, runs: Sequence[str] | None) -> list[str]:
        if runs is None:
            return self.run_names
        for name in runs:
            self._row(name)
        return list(runs)

    def tensors(self, runs: Sequence[str] | None = None,
                columns: Sequence[str] | None = None) -> pa.Table:
        """The tensor index of the selected runs (all by default), run columns first."""
        return self._read(run_tensors_file, CATALOG_TENSOR_SCHEMA, self._selected(runs), columns)

    def checkpoints(self, runs: Sequence[str] | None = None) -> pa.Table:
        """The per-step table of the selected runs, run columns first."""
        return self._read(run_checkpoints_file, CATALOG_CHECKPOINT_SCHEMA, self._selected(runs),
                          None)

    def _read(self, shard_of: Any, schema: pa.Schema, runs: list[str],
              columns: Sequence[str] | None) -> pa.Table:
        if not runs:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables([pq.read_table(self._files.path(shard_of(name)),
                                               columns=list(columns) if columns else None)
                                 for name in runs])

    def stats(self, match: str = "layers.*.attention.dense.weight", kind: str = "model",
              stat: str = "l2", runs: Sequence[str] | None = None,
              steps: Sequence[int] | None = None) -> pa.Table:
        """``stat`` of every ``kind`` tensor matching ``match`` in the selected runs and steps,
        from the catalog's index alone: run columns, step, kind, name, layer, ``stat``; one
        row per run, step and tensor, ordered by run, then as each run's index.

        Args:
            match: glob over tensor names (any dotted tail may match).
            kind: model, master, exp_avg, exp_avg_sq, buffer or state.
            stat: min, max, mean, std, l2, absmax, nan_count, inf_count or zero_count.
            runs: run names (all runs when None).
            steps: steps to keep (all when None).
        """
        if stat not in STATISTICS:
            raise CatalogError(f"unknown statistic {stat!r}; choose from {', '.join(STATISTICS)}")
        index = self.tensors(runs, columns=[*RUN_COLUMNS, *STATS_COLUMNS, stat])
        return index_stats(index, match, kind, stat, steps, lead=RUN_COLUMNS)

    def run(self, name: str) -> Archive:
        """The archive of run ``name``, at the revision the catalog indexed (its commit on the
        Hub), opened with :func:`exporter.open_archive`."""
        if name not in self._archives:
            row = self._row(name)
            ref = MemberRef(row["archive"], row["requested_revision"])
            try:
                archive = open_member(ref, row["revision"])
                archive.manifest  # noqa: B018 - fail here, naming the run, if it is gone
            except (ExporterError, OSError) as exc:
                raise CatalogError(f"run {name}: its archive {ref} cannot be read ({exc}); its "
                                   "statistics still answer from the catalog's index") from exc
            self._archives[name] = archive
        return self._archives[name]

    def unreachable(self, runs: Sequence[str] | None = None) -> dict[str, str]:
        """Runs whose archive cannot be reached now -> why (their indexed rows still answer)."""
        out = {}
        for row in self.runs.to_pylist():
            if runs is None or row["run"] in runs:
                reason = reachable(MemberRef(row["archive"], row["requested_revision"]))
                if reason is not None:
                    out[row["run"]] = reason
        return out


def open_catalog(location: str | os.PathLike[str], revision: str | None = None) -> Catalog:
    """Open a catalog folder or a Hub dataset (``hf://datasets/ORG/NAME[@REVISION]``).

    Args:
        location: the catalog folder (``neox-export catalog --out``), or its Hub dataset.
        revision: Hub branch or commit (Hub catalogs only; ``@REVISION`` in the location too).

    Raises:
        CatalogError: the location holds no catalog.
    """
    text = str(location)
    if text.startswith("hf://"):
        ref = MemberRef.parse(text)
        catalog = Catalog(_CatalogFiles(repo_id=ref.repo_id, revision=revision or ref.revision),
                          text)
        catalog.manifest  # noqa: B018 - a dataset that is no catalog fails here
        return catalog
    root = Path(location)
    if not is_catalog(root):
        raise CatalogError(f"{root}: not a catalog (no {MARKER}); make one with "
                           "`neox-export catalog ARCHIVE... --out FOLDER`")
    return Catalog(_CatalogFiles(root=root), str(root))


def is_catalog_location(location: str, revision: str | None = None) -> bool:
    """Whether ``location`` (a folder or ``hf://datasets/...``) holds a catalog."""
    if location.startswith(HUB_PREFIX):
        try:
            open_catalog(location, revision)
        except CatalogError:
            return False
        return True
    return is_catalog(Path(location))
