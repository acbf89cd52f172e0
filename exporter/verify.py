"""``verify``: check a checkpoint (or an export of one) against its own invariants.

Checks, each reported with a count and the first failures by name:
- ``master->model``: every fp32 master weight cast to the model dtype equals the model weight
  bitwise (mixed-precision training copies master -> model after every step: DeepSpeed
  ``stage_1_and_2.py`` ``step`` / DeeperSpeed ``stage1.py`` ``step``, "all_gather" of the
  updated fp16 partitions);
- ``partitions``: ZeRO partition sizes add up to the parameters plus the recorded padding
  (checked while the partitions are planned);
- ``coverage``: every tensor of every source file is accounted for, every model weight has
  optimizer state, and no file is left unread;
- ``hashes`` (exports): every tensor's bytes match the digest in the index (BLAKE3, or sha256
  in archives written before; :mod:`exporter.convert.digest`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from exporter.convert.digest import index_digest, tensor_digest
from exporter.errors import ExporterError
from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.config import load_neox_config
from exporter.neox.model import plan_model
from exporter.neox.names import Merge, hf_merge_rule, split_module_name
from exporter.neox.state import read_engine_state
from exporter.neox.zero import plan_optimizer
from exporter.records import TensorJob


@dataclass
class Check:
    """One named check: how many items passed, and the failures."""

    name: str
    passed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        total = self.passed + len(self.failures)
        status = "ok" if self.ok else "FAILED"
        text = f"{self.name:<16} {status:<7} {self.passed}/{total}"
        for failure in self.failures[:10]:
            text += f"\n    {failure}"
        if len(self.failures) > 10:
            text += f"\n    ... {len(self.failures) - 10} more"
        return text


@dataclass
class Report:
    target: Path
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        return "\n".join([f"verify {self.target}", *(c.line() for c in self.checks)])


def _whole(job: TensorJob) -> torch.Tensor:
    parts = list(job.chunks(64 << 20))
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=job.dtype)
    return flat.reshape(job.shape)


def verify_checkpoint(folder: Path) -> Report:
    """Verify a source checkpoint folder (see module docstring)."""
    files = scan_checkpoint(folder)
    model = plan_model(files, load_neox_config(files.configs))
    engine = read_engine_state(files, exported_module=True)
    partitions = Check("partitions")
    coverage = Check("coverage")
    invariant = Check("master->model")
    try:
        optimizer = plan_optimizer(files, model, engine)
        partitions.passed += len(files.optim_files)
    except ExporterError as exc:
        partitions.failures.append(str(exc))
        optimizer = None
    coverage.passed += len(model.jobs)
    for path in files.other:
        coverage.failures.append(f"{path.relative_to(folder)}: not a recognised checkpoint file")
    if optimizer is not None:
        coverage.passed += len(optimizer.jobs)
        for name in optimizer.summary.get("parameters_without_state", []):
            coverage.failures.append(f"{name}: no optimizer state in the partition files")
        # Compare shard by shard: the invariant holds on each rank, not after a sum/average merge.
        shards = model.shards
        hf_names = {j.neox_name: j.name for j in model.jobs}
        for mp, params in sorted(optimizer.units.items()):
            tp = optimizer.unit_tp_rank[mp]
            for param in params:
                layer, key = split_module_name(param.name)
                name = hf_names.get(f"{layer}.{key}", param.name)
                if model.tp_size > 1:
                    name = f"{name} (tensor-parallel rank {tp})"
                _compare(invariant, name, param.read("master"), shards[layer][tp][key].read())
    elif files.optim_files:
        invariant.failures.append("optimizer state could not be read (see partitions)")
    return Report(folder, [partitions, coverage, invariant])


def _compare(check: Check, name: str, master: torch.Tensor, model: torch.Tensor) -> None:
    cast = master.to(model.dtype)
    if cast.shape != model.shape:
        check.failures.append(f"{name}: master shape {list(cast.shape)} != model {list(model.shape)}")
    elif torch.equal(cast.view(torch.uint8) if cast.numel() else cast,
                     model.view(torch.uint8) if model.numel() else model):
        check.passed += 1
    else:
        differ = int((cast != model).sum())
        check.failures.append(
            f"{name}: master cast to {str(model.dtype).removeprefix('torch.')} differs from the "
            f"model weight in {differ} of {model.numel()} elements"
        )


def _raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.name.endswith(".zst"):
        from exporter.convert.compress import read_compressed_index, read_compressed_tensor

        for key in read_compressed_index(path):
            if not key.startswith("__"):
                yield key, read_compressed_tensor(path, key)
        return
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            yield key, f.get_tensor(key)


def verify_export(folder: Path) -> Report:
    """Verify a step folder written by ``convert``/``build`` (and its index rows, if in an archive)."""
    invariant = Check("master->model")
    hashes = Check("hashes")
    coverage = Check("coverage")
    master_file = folder / "optimizer" / "master.safetensors"
    if not master_file.exists() and master_file.with_name("master.safetensors.zst").exists():
        master_file = master_file.with_name("master.safetensors.zst")
    model_files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("model*.safetensors.zst"))
    if not model_files:
        coverage.failures.append(f"{folder}: no model.safetensors")
    model = {k: v for p in model_files for k, v in _tensors(p)}
    coverage.passed += len(model)
    tp_size = _tp_size(folder)
    if master_file.exists():
        for name, master in _tensors(master_file):
            if name not in model:
                coverage.failures.append(f"{name}: master weight without a model weight")
            elif tp_size > 1 and hf_merge_rule(name) in (Merge.SUM, Merge.AVERAGE):
                # Summed / averaged shards round differently from their masters: checked on
                # the source checkpoint instead (verify CHECKPOINT_DIR).
                continue
            else:
                _compare(invariant, name, master, model[name])
    rows = _index_rows(folder)
    for row in rows:
        path = folder.parent.parent / row["file"]
        if path.name.endswith(".zst"):
            from exporter.convert.compress import read_compressed_tensor

            data = _raw(read_compressed_tensor(path, row["name"]))
        else:
            with open(path, "rb") as fh:
                fh.seek(row["data_offset_begin"])
                data = fh.read(row["data_offset_end"] - row["data_offset_begin"])
        algorithm, digest = index_digest(row)
        if tensor_digest(algorithm, data) == digest:
            hashes.passed += 1
        else:
            hashes.failures.append(f"{row['kind']} {row['name']}: {algorithm} does not match the index")
    checks = [coverage, invariant] + ([hashes] if rows else [])
    return Report(folder, checks)


def _tp_size(step_folder: Path) -> int:
    import pyarrow.parquet as pq

    shard = step_folder.parent.parent / "index" / "checkpoints" / f"{step_folder.name}.parquet"
    if shard.exists():
        rows = pq.read_table(shard).to_pylist()
        if rows and rows[0].get("tp_size"):
            return int(rows[0]["tp_size"])
    state = step_folder / "state.json"
    if state.exists():
        engine = json.loads(state.read_text(encoding="utf-8")).get("engine", {})
        return max(1, len(engine))
    return 1


def _index_rows(step_folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    root = step_folder.parent.parent
    shard = root / "index" / "tensors" / f"{step_folder.name}.parquet"
    if step_folder.parent.name != "steps" or not shard.exists():
        return []
    return pq.read_table(shard).to_pylist()


def verify_path(path: str | Path) -> list[Report]:
    """Verify a checkpoint folder, a step folder, or every step of an archive."""
    path = Path(path)
    if not path.is_dir():
        raise ExporterError(f"{path}: not a folder")
    if (path / "manifest.json").exists():
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        steps = sorted(int(s) for s in manifest.get("steps", {}))
        if not steps:
            raise ExporterError(f"{path}: archive has no complete steps")
        return [verify_export(path / "steps" / f"step{s}") for s in steps]
    if (path / "config.json").exists() or list(path.glob("model*.safetensors*")):
        return [verify_export(path)]
    return [verify_checkpoint(path)]
