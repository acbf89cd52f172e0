"""Build or update a catalog: one index over many run archives, holding no tensors.

Incremental: each named member is probed first (:func:`exporter.catalog.members.probe`, no
index read); a member whose fingerprint is the one indexed is left alone, a new or changed
one has its index read once and written as the run's shards. A member that cannot be reached
keeps its indexed rows (the update names it); a member whose index disagrees with the archive
schema is refused with the reason. Overrides (``--run NAME=seed=8``) are remembered in
``catalog.json`` and survive re-indexing.

Example (three archives of the tiny sample run, trained with seeds 1, 2, 3):
    >>> from exporter.catalog import build_catalog
    >>> update = build_catalog("catalog", ["archives/seed1", "archives/seed2", "archives/seed3"])
    >>> update.added
    ['seed1', 'seed2', 'seed3']
    >>> build_catalog("catalog", ["archives/seed1"]).unchanged
    ['seed1']
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from exporter import __version__
from exporter.catalog.layout import RUNS_TABLE as RUNS_FILE
from exporter.catalog.layout import (
    check_run_name,
    is_catalog,
    marker_path,
    run_checkpoints_file,
    run_tensors_file,
)
from exporter.catalog.members import (
    PROBE_RETRY,
    MemberRef,
    default_run_name,
    member_config,
    model_parameters,
    open_member,
    probe,
    read_member,
    run_metadata,
)
from exporter.catalog.schema import (
    CATALOG_CHECKPOINT_SCHEMA,
    CATALOG_FORMAT_VERSION,
    CATALOG_TENSOR_SCHEMA,
    RUNS_SCHEMA,
    with_run_columns,
    without_run_columns,
)
from exporter.errors import CatalogError, ExporterError
from exporter.files import write_bytes_atomic, write_json_atomic
from exporter.hub.calls import RetryPolicy


@dataclass
class CatalogUpdate:
    """What an update did, run by run.

    Attributes:
        added: runs indexed for the first time.
        reindexed: runs whose archive changed, indexed again.
        unchanged: runs whose archive is as indexed (their index was not read).
        relabelled: runs whose metadata an override changed (no member read).
        unreachable: run -> why its archive could not be read; its indexed rows stay.
        failed: member -> why it was not added (unreachable, refused schema, name clash).
    """

    root: Path
    added: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _write_parquet(path: Path, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(path, sink.getvalue())


class _CatalogFolder:
    """The local catalog being updated: its runs table and remembered overrides."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if root.exists() and not root.is_dir():
            raise CatalogError(f"{root}: not a folder")
        if root.is_dir() and any(root.iterdir()) and not is_catalog(root):
            raise CatalogError(f"{root}: not a catalog (no {marker_path(root).name}) and not "
                               "empty; choose a new --out folder")
        self.runs: dict[str, dict[str, Any]] = {}
        self.overrides: dict[str, dict[str, Any]] = {}
        if is_catalog(root):
            marker = json.loads(marker_path(root).read_text(encoding="utf-8"))
            if marker.get("format_version") != CATALOG_FORMAT_VERSION:
                raise CatalogError(f"{root}: catalog format {marker.get('format_version')}, this "
                                   f"neox-exporter writes {CATALOG_FORMAT_VERSION}")
            self.runs = {r["run"]: r for r in pq.read_table(root / RUNS_FILE).to_pylist()}
            self.overrides = {name: dict(entry.get("overrides", {}))
                              for name, entry in marker.get("runs", {}).items()}

    def find(self, ref: MemberRef) -> dict[str, Any] | None:
        return next((r for r in self.runs.values() if r["archive"] == ref.location
                     and r["requested_revision"] == ref.revision), None)

    def read_shard(self, relative: str) -> pa.Table:
        return pq.read_table(self.root / relative)

    def write_run(self, row: dict[str, Any], tensors: pa.Table, checkpoints: pa.Table,
                  old_name: str | None) -> None:
        """Write a run's shards (archive columns in ``tensors``/``checkpoints``) and row."""
        _write_parquet(self.root / run_tensors_file(row["run"]),
                       with_run_columns(tensors, row, CATALOG_TENSOR_SCHEMA))
        _write_parquet(self.root / run_checkpoints_file(row["run"]),
                       with_run_columns(checkpoints, row, CATALOG_CHECKPOINT_SCHEMA))
        if old_name is not None and old_name != row["run"]:
            self.drop(old_name)
        self.runs[row["run"]] = row

    def drop(self, name: str) -> None:
        for relative in (run_tensors_file(name), run_checkpoints_file(name)):
            (self.root / relative).unlink(missing_ok=True)
        self.runs.pop(name, None)
        self.overrides.pop(name, None)

    def save(self, license: str, redraw: bool) -> None:
        rows = sorted(self.runs.values(), key=lambda r: r["run"])
        _write_parquet(self.root / RUNS_FILE, pa.Table.from_pylist(rows, schema=RUNS_SCHEMA))
        write_json_atomic(marker_path(self.root), {
            "format_version": CATALOG_FORMAT_VERSION,
            "tool": {"name": "neox-exporter", "version": __version__},
            "license": license,
            "runs": {r["run"]: {"archive": r["archive"],
                                "requested_revision": r["requested_revision"],
                                "overrides": self.overrides.get(r["run"], {})} for r in rows},
        })
        from exporter.catalog.card import write_catalog_card

        write_catalog_card(self.root, license=license, redraw=redraw)


def _override_for(overrides: Mapping[str, Mapping[str, Any]], used: set[str],
                  *keys: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        if key is not None and key in overrides:
            out.update(overrides[key])
            used.add(key)
    return out


def build_catalog(
    out: str | Path,
    members: Sequence[str] = (),
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    refresh: bool = False,
    license: str = "apache-2.0",
    retry: RetryPolicy = PROBE_RETRY,
    progress: Callable[[str], None] | None = None,
) -> CatalogUpdate:
    """Add the archives ``members`` to the catalog at ``out`` (created if missing).

    Args:
        out: the catalog folder.
        members: archive folders or ``hf://datasets/ORG/NAME[@REVISION]``.
        overrides: run (or member as given) -> fields to set: ``run`` (a new name),
            ``model_size``, ``seed``, ``variant`` (:func:`exporter.catalog.members.parse_override`).
        refresh: probe every member already in the catalog too, re-indexing changed ones.
        license: the card's license identifier.
        retry: backoff for Hub calls that probe members.
        progress: called with one line per member.

    Returns:
        What was added, re-indexed, left alone, or could not be read.

    Raises:
        CatalogError: ``out`` is not a catalog, or there is nothing to do.
    """
    say = progress or (lambda line: None)
    folder = _CatalogFolder(Path(out))
    overrides = dict(overrides or {})
    update = CatalogUpdate(folder.root)
    used: set[str] = set()
    refs = [(MemberRef.parse(text), text) for text in members]
    if refresh:
        named = {ref for ref, _ in refs}
        refs += [(ref, row["run"]) for row in list(folder.runs.values())
                 if (ref := MemberRef(row["archive"], row["requested_revision"])) not in named]
    if not refs and not overrides and not folder.runs:
        raise CatalogError("nothing to do: name archives to add to the catalog")
    folder.root.mkdir(parents=True, exist_ok=True)
    for ref, text in refs:
        existing = folder.find(ref)
        try:
            fingerprint, commit = probe(ref, retry)
        except (ExporterError, OSError) as exc:
            if existing is None:
                update.failed[str(ref)] = f"cannot be read: {exc}"
                say(f"failed      {ref}: {exc}")
            else:
                update.unreachable[existing["run"]] = str(exc)
                say(f"unreachable {existing['run']}: {exc}; its indexed rows stay")
            continue
        if existing is not None and existing["fingerprint"] == fingerprint:
            update.unchanged.append(existing["run"])
            say(f"unchanged   {existing['run']}")
            continue
        try:
            row, tables = _index_member(ref, commit, fingerprint, text, existing, folder,
                                        overrides, used)
        except (ExporterError, OSError) as exc:
            update.failed[existing["run"] if existing else str(ref)] = str(exc)
            say(f"failed      {ref}: {exc}")
            continue
        folder.write_run(row, tables[0], tables[1], existing["run"] if existing else None)
        (update.reindexed if existing else update.added).append(row["run"])
        say(f"{'re-indexed' if existing else 'added':<11} {row['run']} ({row['steps']} steps, "
            f"{row['tensors']} index rows)")
    for key in sorted(set(overrides) - used):
        done = len(update.relabelled)
        _relabel(folder, key, overrides[key], update)
        if key in update.failed:
            say(f"failed      {update.failed[key]}")
        elif len(update.relabelled) > done:
            say(f"relabelled  {update.relabelled[-1]}")
    folder.save(license, redraw=bool(update.added or update.reindexed or update.relabelled))
    return update


def _index_member(ref: MemberRef, commit: str | None, fingerprint: str, text: str,
                  existing: dict[str, Any] | None, folder: _CatalogFolder,
                  overrides: Mapping[str, Mapping[str, Any]],
                  used: set[str]) -> tuple[dict[str, Any], tuple[pa.Table, pa.Table]]:
    """Read one member's index and make its run row (raises on refusal)."""
    archive = open_member(ref, commit)
    tables = read_member(archive, str(ref))
    derived = default_run_name(ref, tables.manifest)
    remembered = folder.overrides.get(existing["run"], {}) if existing else {}
    fields = {**remembered, **_override_for(overrides, used, derived, text, ref.location,
                                            existing["run"] if existing else None)}
    name = check_run_name(fields.get("run") or (existing["run"] if existing else derived))
    clash = folder.runs.get(name)
    if clash is not None and clash is not existing:
        raise CatalogError(f"{ref}: refused: run name {name!r} already names {clash['archive']}; "
                           f"give it another with --run {derived}=run=NEW-NAME")
    steps = archive.steps
    parameters = model_parameters(tables.tensors)
    metadata = run_metadata(derived, str(tables.manifest.get("source", "")),
                            member_config(ref, commit, steps[0]), parameters)
    metadata.update({k: v for k, v in fields.items() if k != "run"})
    row = {"run": name, **metadata, "archive": ref.location, "revision": commit,
           "source": str(tables.manifest.get("source", "")), "requested_revision": ref.revision,
           "steps": len(steps), "first_step": steps[0], "last_step": steps[-1],
           "tensors": tables.tensors.num_rows, "parameters": parameters,
           "fingerprint": fingerprint}
    if fields:
        folder.overrides[name] = fields
    return row, (tables.tensors, tables.checkpoints)


def _relabel(folder: _CatalogFolder, key: str, fields: Mapping[str, Any],
             update: CatalogUpdate) -> None:
    """Apply an override to a run already indexed, from the catalog's own shards."""
    row = folder.runs.get(key) or folder.find(MemberRef.parse(key))
    if row is None:
        update.failed[key] = (f"--run {key}: no such run in the catalog (runs: "
                              f"{', '.join(sorted(folder.runs)) or 'none'})")
        return
    old = row["run"]
    new = {**row, **fields}
    if new["run"] != old and new["run"] in folder.runs:
        update.failed[key] = f"--run {key}: run name {new['run']!r} is taken"
        return
    if new == row:  # the same override again: nothing to rewrite
        folder.overrides[old] = {**folder.overrides.get(old, {}), **fields}
        return
    tensors = without_run_columns(folder.read_shard(run_tensors_file(old)))
    checkpoints = without_run_columns(folder.read_shard(run_checkpoints_file(old)))
    remembered = {**folder.overrides.pop(old, {}), **fields}
    folder.write_run(new, tensors, checkpoints, old)
    folder.overrides[new["run"]] = remembered
    update.relabelled.append(new["run"])

