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

A Hub dataset (``hf://datasets/ORG/NAME``) is read the same way; only the files a call
needs are downloaded (into the Hugging Face cache).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from exporter.archive.layout import step_dir
from exporter.errors import ArchiveError
from exporter.records import TORCH_DTYPES

KIND_FILES = {
    "master": "optimizer/master.safetensors",
    "exp_avg": "optimizer/exp_avg.safetensors",
    "exp_avg_sq": "optimizer/exp_avg_sq.safetensors",
    "buffer": "buffers.safetensors",
    "state": "state.safetensors",
}


class _Files:
    """Local access to archive files (a folder, or Hub downloads on demand)."""

    def __init__(self, root: Path | None = None, repo_id: str | None = None,
                 revision: str | None = None) -> None:
        self.root = root
        self.repo_id = repo_id
        self.revision = revision

    def listing(self, prefix: str) -> list[str]:
        if self.root is not None:
            base = self.root / prefix
            if not base.is_dir():
                return []
            return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            files = HfApi().list_repo_files(self.repo_id, repo_type="dataset", revision=self.revision)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ArchiveError(f"hf://datasets/{self.repo_id}: {exc}") from exc
        return sorted(f for f in files if f.startswith(prefix))

    def path(self, relative: str) -> Path:
        if self.root is not None:
            path = self.root / relative
            if not path.exists():
                raise ArchiveError(f"{self.root}: missing {relative}")
            return path
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.repo_id, relative, repo_type="dataset",
                                        revision=self.revision))
        except EntryNotFoundError as exc:
            raise ArchiveError(f"hf://datasets/{self.repo_id}: missing {relative}") from exc
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ArchiveError(f"hf://datasets/{self.repo_id}: {exc}") from exc


class SafetensorsMap:
    """A safetensors file mapped into memory; tensors are zero-copy views of the mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise ArchiveError(f"{path}: not a safetensors file")
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(size - 8, 100 << 20):
                raise ArchiveError(f"{path}: corrupt safetensors header")
            try:
                self.header: dict[str, Any] = json.loads(fh.read(header_len))
            except ValueError as exc:
                raise ArchiveError(f"{path}: corrupt safetensors header") from exc
            self._start = 8 + header_len
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > self._start else None

    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def get(self, name: str) -> torch.Tensor:
        entry = self.header.get(name)
        if entry is None or name == "__metadata__":
            raise KeyError(name)
        dtype = TORCH_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin,
                               offset=self._start + begin)
        return raw.view(dtype).reshape(shape)


class CompressedTensors:
    """A ``.safetensors.zst`` file (``--compress zstd``): tensors are decompressed on read, not
    memory-mapped (still no pickle)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, name: str) -> torch.Tensor:
        from exporter.convert.compress import read_compressed_tensor

        return read_compressed_tensor(self.path, name)


class Archive:
    """An archive written by ``neox-export build``: steps, index, tensors, state.

    Open one with :func:`open_archive`.
    """

    def __init__(self, files: _Files, label: str) -> None:
        self._files = files
        self.label = label
        self._maps: dict[str, SafetensorsMap] = {}

    def __repr__(self) -> str:
        return f"Archive({self.label!r}, steps={self.steps})"

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return json.loads(self._files.path("manifest.json").read_text(encoding="utf-8"))

    @property
    def steps(self) -> list[int]:
        """Completed steps, ascending."""
        return sorted(int(s) for s in self.manifest.get("steps", {}))

    def _table(self, folder: str) -> pa.Table:
        paths = [p for p in self._files.listing(folder) if p.endswith(".parquet")]
        if not paths:
            raise ArchiveError(f"{self.label}: no {folder} index")
        paths.sort(key=lambda p: (len(p), p))  # step{N}.parquet in step order
        # Shards from before and after the digest column differ in columns: promote to one.
        return pa.concat_tables([pq.read_table(self._files.path(p)) for p in paths],
                                promote_options="default")

    @cached_property
    def index(self) -> pa.Table:
        """The tensor index (one row per tensor per step) as a pyarrow Table."""
        return self._table("index/tensors")

    @cached_property
    def checkpoints(self) -> pa.Table:
        """The checkpoint index (one row per step)."""
        return self._table("index/checkpoints")

    def _check_step(self, step: int) -> None:
        if step not in self.steps:
            raise ArchiveError(f"{self.label}: no step {step} (steps: {self.steps})")

    def _row(self, step: int, name: str, kind: str) -> dict[str, Any]:
        mask = pc.and_(pc.and_(pc.equal(self.index["step"], step), pc.equal(self.index["name"], name)),
                       pc.equal(self.index["kind"], kind))
        rows = self.index.filter(mask).to_pylist()
        if not rows:
            self._check_step(step)
            raise ArchiveError(f"{self.label}: step {step} has no {kind} tensor {name!r}")
        return rows[0]

    def _map(self, relative: str) -> SafetensorsMap | CompressedTensors:
        if relative not in self._maps:
            path = self._files.path(relative)
            if relative.endswith(".zst"):
                self._maps[relative] = CompressedTensors(path)
            else:
                self._maps[relative] = SafetensorsMap(path)
        return self._maps[relative]

    def tensor(self, step: int, name: str, kind: str = "model") -> torch.Tensor:
        """One tensor, memory-mapped (read-only semantics: writes stay private to the process;
        tensors of ``--compress`` archives are decompressed instead).

        Args:
            step: training step.
            name: Hugging Face name (``gpt_neox.layers.0.attention.dense.weight``).
            kind: model, master, exp_avg, exp_avg_sq, buffer or state.
        """
        row = self._row(step, name, kind)
        return self._map(row["file"]).get(name)

    def state_dict(self, step: int, kind: str = "model") -> dict[str, torch.Tensor]:
        """Every tensor of one kind at one step, by name, memory-mapped."""
        self._check_step(step)
        mask = pc.and_(pc.equal(self.index["step"], step), pc.equal(self.index["kind"], kind))
        rows = self.index.filter(mask).to_pylist()
        if not rows:
            raise ArchiveError(f"{self.label}: step {step} has no {kind} tensors")
        return {r["name"]: self._map(r["file"]).get(r["name"]) for r in rows}

    def state(self, step: int) -> dict[str, Any]:
        """The engine and optimizer state of a step (``state.json``)."""
        self._check_step(step)
        return json.loads(self._files.path(f"steps/step{step}/state.json").read_text(encoding="utf-8"))

    def model_path(self, step: int) -> Path:
        """A local folder that ``transformers.GPTNeoXForCausalLM.from_pretrained`` loads."""
        self._check_step(step)
        if self._files.root is not None:
            return step_dir(self._files.root, step)
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            self._files.repo_id, repo_type="dataset", revision=self._files.revision,
            allow_patterns=[f"steps/step{step}/config.json", f"steps/step{step}/model*"],
        )
        return Path(folder) / "steps" / f"step{step}"


def open_archive(location: str | os.PathLike[str], revision: str | None = None) -> Archive:
    """Open an archive folder or a Hub dataset (``hf://datasets/ORG/NAME``).

    Args:
        location: local archive folder, or ``hf://datasets/ORG/NAME``.
        revision: Hub branch or commit (Hub datasets only).

    Example:
        >>> import pyarrow.compute as pc
        >>> archive = open_archive("archive")
        >>> archive.checkpoints.column("iteration").to_pylist()
        [0, 1, 2, 4, 8]
        >>> model = archive.index.filter(pc.equal(archive.index["kind"], "model"))
        >>> model.num_rows // len(archive.steps)          # tensors per step
        28
    """
    text = str(location)
    if text.startswith("hf://"):
        repo = text.removeprefix("hf://")
        if not repo.startswith("datasets/"):
            raise ArchiveError(f"{text}: archives live in dataset repositories (hf://datasets/ORG/NAME)")
        repo_id = repo.removeprefix("datasets/").strip("/")
        return Archive(_Files(repo_id=repo_id, revision=revision), text)
    root = Path(location)
    if not (root / "manifest.json").exists():
        raise ArchiveError(f"{root}: not an archive (no manifest.json)")
    return Archive(_Files(root=root), str(root))
