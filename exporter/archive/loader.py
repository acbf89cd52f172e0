"""Read an archive back: tensors memory-mapped from safetensors files, never a pickle.

Example (an archive of the tiny sample run, ``neox-export build runs/tiny --out archive``):
    >>> from exporter import open_archive
    >>> archive = open_archive("archive")
    >>> archive.steps
    [0, 1, 2, 4, 8]
    >>> w = archive.tensor(8, "gpt_neox.layers.0.attention.dense.weight")
    >>> w.dtype, tuple(w.shape)
    (torch.float16, (32, 32))
    >>> weights = archive.state_dict(8)
    >>> bool((weights["gpt_neox.layers.0.attention.dense.weight"] == w).all())
    True

Optimizer state reads the same way with ``kind="master"``, ``"exp_avg"`` or ``"exp_avg_sq"``
(archives built with ``--include optimizer``).

A Hub dataset (``hf://datasets/ORG/NAME``, or ``...@REVISION`` pinned) is read the same way:
manifest and index are downloaded (into the Hugging Face cache), and a tensor costs its byte
range only, checked against the index digest and cached (``exporter/archive/remote.py``).

Across steps, and statistics without tensors:
    >>> [step for step, _ in archive.trajectory(DENSE, steps=[4, 8])]
    [4, 8]
    >>> archive.stats("layers.0.attention.dense.weight", stat="absmax").num_rows
    5

The files of a local archive that ``build --push-to ... --delete-after-push`` removed are read
from the Hub: ``.push/step{N}.json`` names the dataset and commit that hold them
(:mod:`exporter.archive.push_state`).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import torch

from exporter.archive.access import HubFiles, LocalFiles
from exporter.archive.cache import TensorCache
from exporter.archive.digest import digest_key, digest_matches
from exporter.archive.header import check_row
from exporter.archive.layout import (
    CHECKPOINT_INDEX_DIR,
    MANIFEST,
    STATE_JSON,
    TENSOR_INDEX_DIR,
    is_archive,
    model_patterns,
    step_dir,
    step_file,
    step_prefix,
    tensor_index_file,
)
from exporter.archive.push_state import read_push_record
from exporter.archive.query import index_dataset, matching_names, select, statistics_table
from exporter.archive.remote import HUB_PREFIX, HubReader, parse_hub_location
from exporter.archive.tensorfile import CompressedTensors, SafetensorsMap, tensor_from_bytes
from exporter.archive.trust import check_model_folder, read_json
from exporter.archive.validate import read_shard, validate_manifest
from exporter.errors import ArchiveError
from exporter.hub.calls import RetryPolicy
from exporter.records import KINDS

#: the tensor the examples read
DENSE = "gpt_neox.layers.0.attention.dense.weight"


class Archive:
    """An archive written by ``neox-export build``: steps, index, tensors, state.

    Open one with :func:`open_archive`. ``revision`` is the commit a Hub archive reads
    (resolved once, when opened), None for a folder.
    """

    def __init__(self, files: LocalFiles | HubFiles, label: str) -> None:
        self._files = files
        self.label = label
        self._maps: dict[str, SafetensorsMap | CompressedTensors] = {}
        self._downloaded: dict[str, Path] = {}
        self._hub = files.reader if isinstance(files, HubFiles) else None
        self.revision: str | None = self._hub.commit if self._hub is not None else None

    def __repr__(self) -> str:
        return f"Archive({self.label!r}, steps={self.steps})"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        label = f"{self.label}/{MANIFEST}"
        return validate_manifest(read_json(self._files.path(MANIFEST), label), label)

    @property
    def steps(self) -> list[int]:
        """Completed steps, ascending."""
        return sorted(int(s) for s in self.manifest.get("steps", {}))

    @cached_property
    def index(self) -> ds.Dataset:
        """The tensor index (one row per tensor per step) as a pyarrow Dataset over the step
        shards: filters on ``step``, ``kind`` and ``name`` are pushed down to the Parquet files.

        Example:
            >>> import pyarrow.dataset as ds
            >>> archive = open_archive("archive")
            >>> rows = archive.index.to_table(filter=(ds.field("step") == 8)
            ...                               & (ds.field("kind") == "model"), columns=["name"])
            >>> rows.num_rows
            28
        """
        return index_dataset(self._shards(TENSOR_INDEX_DIR), self.label)

    @cached_property
    def checkpoints(self) -> pa.Table:
        """The checkpoint index (one row per step)."""
        tables = self._shards(CHECKPOINT_INDEX_DIR)
        if not tables:
            raise ArchiveError(f"{self.label}: no {CHECKPOINT_INDEX_DIR} index")
        return pa.concat_tables(tables)

    def _shards(self, folder: str) -> list[pa.Table]:
        """The shards of one index table, each validated against the committed schema
        (:func:`exporter.archive.validate.read_shard`) before any row is used."""
        return [read_shard(path, f"{self.label}/{folder}/{path.name}")
                for path in self._files.index_paths(folder, self.steps)]

    def _check_step(self, step: int) -> None:
        if step not in self.steps:
            raise ArchiveError(f"{self.label}: no step {step} (steps: {self.steps})")

    def _check_query(self, step: Any, kind: str) -> int:
        """``step`` as an int and ``kind`` one of KINDS, or an ArchiveError saying which are."""
        if isinstance(step, bool) or not isinstance(step, int):
            try:
                step = operator.index(step)  # numpy integers
            except TypeError:
                raise ArchiveError(f"{self.label}: step must be an int such as "
                                   f"{self.steps[-1] if self.steps else 0}, got {step!r} "
                                   f"({type(step).__name__}); steps: {self.steps}") from None
        if kind not in KINDS:
            raise ArchiveError(f"{self.label}: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        return step

    def _row(self, step: int, name: str, kind: str) -> dict[str, Any]:
        step = self._check_query(step, kind)
        rows = select(self.index, kind=kind, steps=[step], names=[name]).to_pylist()
        if not rows:
            self._check_step(step)
            raise ArchiveError(f"{self.label}: step {step} has no {kind} tensor {name!r}")
        return rows[0]

    def _map(self, relative: str) -> SafetensorsMap | CompressedTensors:
        if relative not in self._maps:
            path = self._downloaded.get(relative) or self._files.path(relative)
            if relative.endswith(".zst"):
                self._maps[relative] = CompressedTensors(path)
            else:
                self._maps[relative] = SafetensorsMap(path)
        return self._maps[relative]

    def _read(self, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The tensors of index rows: memory-mapped from local (or downloaded) files; from a
        Hub archive, by byte range, checked against the index digest, and cached."""
        ranged = [r for r in rows if self._hub is not None and r["file"] not in self._downloaded
                  and not r["file"].endswith(".zst")]
        found: dict[str, bytearray | memoryview] = {}
        if ranged:
            assert self._hub is not None
            missing = []
            for row in ranged:  # cache entries are checked again: a damaged one is read anew
                cached = self._hub.cache.get(digest_key(row))
                if cached is not None and digest_matches(cached, row):
                    found[digest_key(row)] = cached
                else:
                    missing.append(row)
            if missing:
                found.update(self._hub.fetch(missing))
        tensors, used = [], set()
        for row in rows:
            key = digest_key(row)
            if key in found:  # a second row with the same bytes gets its own copy
                data = found[key] if key not in used else bytearray(found[key])
                used.add(key)
                tensors.append(tensor_from_bytes(data, row["dtype"], row["shape"]))
            else:
                tensors.append(self._mapped(row))
        return tensors

    def _mapped(self, row: dict[str, Any]) -> torch.Tensor:
        """The tensor of an index row from its local file, once the file's header agrees
        with the row."""
        tensors = self._map(row["file"])
        check_row(row, tensors.header, f"{self.label}/{tensor_index_file(row['step'])}",
                  f"{self.label}/{row['file']}")
        return tensors.get(row["name"])

    def tensor(self, step: int, name: str, kind: str = "model") -> torch.Tensor:
        """One tensor: memory-mapped from a local archive (read-only semantics: writes stay
        private to the process; tensors of ``--compress`` archives are decompressed); from a
        Hub archive, only its byte range is read, checked against its index digest and cached.

        Args:
            step: training step.
            name: Hugging Face name (``gpt_neox.layers.0.attention.dense.weight``).
            kind: model, master, exp_avg, exp_avg_sq, buffer or state.

        Raises:
            ArchiveError: no such step or tensor; IntegrityError when the bytes read are not
                the ones the index records.
        """
        return self._read([self._row(step, name, kind)])[0]

    def state_dict(self, step: int, kind: str = "model") -> dict[str, torch.Tensor]:
        """Every tensor of one kind at one step, by name (Hub: concurrent, coalesced ranges)."""
        step = self._check_query(step, kind)
        self._check_step(step)
        rows = select(self.index, kind=kind, steps=[step]).to_pylist()
        if not rows:
            raise ArchiveError(f"{self.label}: step {step} has no {kind} tensors")
        return dict(zip([r["name"] for r in rows], self._read(rows), strict=True))

    def _trajectory_rows(self, name: str, kind: str,
                         steps: Iterable[int] | None) -> list[dict[str, Any]]:
        names = matching_names(self.index, name, kind)
        if len(names) != 1:
            found = ", ".join(names[:5]) if names else "none"
            raise ArchiveError(f"{self.label}: a trajectory follows one {kind} tensor; "
                               f"{name!r} matches {len(names)} ({found})")
        wanted = self.steps if steps is None else sorted(set(steps))
        for step in wanted:
            self._check_step(step)
        rows = select(self.index, kind=kind, steps=wanted, names=names).to_pylist()
        return sorted(rows, key=lambda r: r["step"])

    def trajectory(self, name: str, kind: str = "model", steps: Iterable[int] | None = None, *,
                   stack: bool = False, memory_budget: int = 2 << 30
                   ) -> Iterator[tuple[int, torch.Tensor]] | tuple[list[int], torch.Tensor]:
        """One tensor across steps, in step order, reading only its bytes.

        Args:
            name: a tensor name, or a glob matching exactly one (``layers.3.*dense.weight``).
            kind: model, master, exp_avg, exp_avg_sq, buffer or state.
            steps: the steps to read (all when None).
            stack: return ``(steps, tensor)`` with the tensors stacked on a new first
                dimension, when they fit in ``memory_budget`` bytes; otherwise yield
                ``(step, tensor)`` pairs (Hub archives read ahead a window of steps
                concurrently).
            memory_budget: the most bytes ``stack=True`` may hold.

        Raises:
            ArchiveError: the name matches no tensor or several, an unknown step, or a stack
                over the budget.

        Example:
            >>> archive = open_archive("archive")
            >>> [step for step, _ in archive.trajectory("layers.0.attention.dense.weight")]
            [0, 1, 2, 4, 8]
            >>> steps, stacked = archive.trajectory(DENSE, stack=True)
            >>> tuple(stacked.shape)
            (5, 32, 32)
        """
        rows = self._trajectory_rows(name, kind, steps)
        if stack:
            total = sum(r["data_offset_end"] - r["data_offset_begin"] for r in rows)
            if total > memory_budget:
                raise ArchiveError(f"{self.label}: {len(rows)} steps of {rows[0]['name']!r} take "
                                   f"{total} bytes, over the memory budget of {memory_budget}; "
                                   f"iterate instead (stack=False)")
            return [r["step"] for r in rows], torch.stack(self._read(rows))
        return self._iterate(rows)

    def _iterate(self, rows: list[dict[str, Any]]) -> Iterator[tuple[int, torch.Tensor]]:
        window = max(1, self._hub.concurrency if self._hub is not None else 1)
        for start in range(0, len(rows), window):
            part = rows[start:start + window]
            yield from zip([r["step"] for r in part], self._read(part), strict=True)

    def stats(self, match: str, kind: str = "model", stat: str | Sequence[str] = "l2",
              steps: Iterable[int] | None = None) -> pa.Table:
        """Statistics of the tensors matching a glob, per step, from the index alone (no
        tensor byte is read). Columns: ``step``, ``name``, ``layer``, then each statistic.

        Example:
            >>> table = open_archive("archive").stats("layers.*.attention.dense.weight")
            >>> table.column_names, table.num_rows
            (['step', 'name', 'layer', 'l2'], 10)
        """
        return statistics_table(self.index, match, kind=kind, stat=stat, steps=steps,
                                label=self.label)

    def download(self, steps: Iterable[int] | None = None,
                 kinds: Iterable[str] | None = None) -> list[Path]:
        """Whole files of some steps (all when None) and kinds (all when None), as local paths;
        later reads of their tensors memory-map them instead of reading ranges. A local
        archive's files are returned as they are."""
        wanted = self.steps if steps is None else sorted(set(steps))
        for step in wanted:
            self._check_step(step)
        table = select(self.index, steps=wanted, columns=["kind", "file"])
        files = sorted({f for k, f in zip(table["kind"].to_pylist(), table["file"].to_pylist(),
                                          strict=True) if kinds is None or k in set(kinds)})
        if self._hub is None:
            return [self._files.path(f) for f in files]
        paths = self._hub.paths(files)
        self._downloaded.update(zip(files, paths, strict=True))
        return paths

    def state(self, step: int) -> dict[str, Any]:
        """The engine and optimizer state of a step (``state.json``)."""
        self._check_step(step)
        relative = step_file(step, STATE_JSON)
        return read_json(self._files.path(relative), f"{self.label}/{relative}")

    def model_path(self, step: int) -> Path:
        """A local folder that ``transformers.GPTNeoXForCausalLM.from_pretrained`` loads."""
        self._check_step(step)
        from huggingface_hub import snapshot_download

        if isinstance(self._files, LocalFiles):
            root = self._files.root
            pushed = read_push_record(root, step)
            if pushed is None or all((root / p).exists() for p in pushed.deleted):
                check_model_folder(root, step_prefix(step), self.label)
                return step_dir(root, step)
            folder = snapshot_download(pushed.repo_id, repo_type="dataset",
                                       revision=pushed.commit or pushed.revision,
                                       allow_patterns=model_patterns(step))
            return Path(folder) / step_prefix(step)
        reader = self._files.reader
        folder = snapshot_download(
            reader.repo_id, repo_type="dataset", revision=reader.commit, token=reader.token,
            allow_patterns=model_patterns(step),
        )
        snapshot = Path(folder)
        check_model_folder(snapshot.parent.parent, f"snapshots/{snapshot.name}/{step_prefix(step)}",
                           self.label)
        return snapshot / step_prefix(step)


def open_archive(location: str | os.PathLike[str], revision: str | None = None, *,
                 cache_dir: str | os.PathLike[str] | None = None, concurrency: int = 8,
                 retry: RetryPolicy | None = None, token: str | None = None) -> Archive:
    """Open an archive folder or a Hub dataset (``hf://datasets/ORG/NAME[@REVISION]``).

    Args:
        location: local archive folder, or ``hf://datasets/ORG/NAME``, optionally pinned to a
            branch, tag or commit with ``@REVISION``.
        revision: Hub branch or commit (same as ``@REVISION``); ``main`` when neither.
        cache_dir: where tensors read by range are cached (default: under the Hugging Face
            assets cache, ``HF_ASSETS_CACHE``).
        concurrency: Hub requests in flight at once.
        retry: backoff for transient Hub errors.
        token: Hub token (``HF_TOKEN`` or the saved login when None).

    Example:
        >>> archive = open_archive("archive")
        >>> archive.checkpoints.column("iteration").to_pylist()
        [0, 1, 2, 4, 8]
        >>> model = archive.index.to_table(filter=ds.field("kind") == "model")
        >>> model.num_rows // len(archive.steps)          # tensors per step
        28
    """
    text = str(location)
    if text.startswith(HUB_PREFIX):
        where = parse_hub_location(text, revision)
        reader = HubReader(where, cache=TensorCache(cache_dir), retry_policy=retry,
                           concurrency=concurrency, token=token)
        return Archive(HubFiles(reader), f"hf://datasets/{where.repo_id}@{reader.commit}")
    root = Path(location)
    if not is_archive(root):
        raise ArchiveError(f"{root}: not an archive (no {MANIFEST})")
    return Archive(LocalFiles(root), str(root))
