"""``verify``: check a checkpoint (or an export of one) against its own invariants.

Checks, each reported with a count and the first failures by name:
- ``master->model``: every fp32 master weight cast to the model dtype equals the model weight
  bitwise (mixed-precision training copies master -> model after every step: DeepSpeed
  ``stage_1_and_2.py`` ``step`` / DeeperSpeed ``stage1.py`` ``step``, "all_gather" of the
  updated fp16 partitions). An export written with ``--dtype`` holds that source weight cast
  once more, so there the check is master -> source dtype -> output dtype (the source dtype
  comes from the checkpoint index's ``model_dtype``, or the model file's metadata);
- ``partitions``: ZeRO partition sizes add up to the parameters plus the recorded padding
  (checked while the partitions are planned);
- ``coverage``: every tensor of every source file is accounted for, every model weight has
  optimizer state, and no file is left unread;
- ``hashes`` (exports): every tensor's bytes match the digest in the index (BLAKE3, or sha256
  in archives written before; :mod:`exporter.convert.digest`).

Files that ``build --push-to ... --delete-after-push`` removed after a verified push
(``.push/step{N}.json``) are not checked here: the report says which live only on the Hub,
and where, and checks what is local.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from exporter.archive.header import check_row, read_safetensors_header
from exporter.archive.layout import (
    CONFIG,
    KIND_FILES,
    MANIFEST,
    SOURCE_DTYPE_KEY,
    STATE_JSON,
    archive_of_step_dir,
    checkpoint_index_file,
    checkpoint_index_path,
    compressed,
    folder_step,
    is_archive,
    manifest_path,
    model_files,
    step_prefix,
    tensor_index_file,
)
from exporter.archive.push_state import read_push_record
from exporter.archive.text import terminal_text
from exporter.archive.trust import read_json, resolve_inside
from exporter.archive.validate import read_shard, validate_manifest
from exporter.convert.digest import index_digest, tensor_digest
from exporter.dtypes import float32, to_torch
from exporter.errors import ArchiveError, ExporterError
from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.config import read_neox_config
from exporter.neox.model import plan_model
from exporter.neox.names import Merge, hf_merge_rule, split_module_name
from exporter.neox.state import read_engine_state
from exporter.neox.zero import plan_optimizer
from exporter.neox.zero.common import ParamSlices
from exporter.records import dtype_name
from exporter.torchfile import TensorRef


@dataclass
class Check:
    """One named check: how many items passed, and the failures."""

    name: str
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    #: why nothing was checked (a model-only folder has no master weights): said, not "ok 0/0"
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        if self.skipped is not None and self.passed == 0 and not self.failures:
            return f"{self.name:<16} skipped: {self.skipped}"
        total = self.passed + len(self.failures)
        status = "ok" if self.ok else "FAILED"
        text = f"{self.name:<16} {status:<7} {self.passed}/{total}"
        for failure in self.failures[:10]:
            text += f"\n    {terminal_text(failure)}"
        if len(self.failures) > 10:
            text += f"\n    ... {len(self.failures) - 10} more"
        return text


@dataclass
class Report:
    """The checks of one target; ``notes`` say what was not checked here, and why."""

    target: Path
    checks: list[Check]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        return "\n".join([f"verify {self.target}", *(c.line() for c in self.checks),
                          *(f"note: {n}" for n in self.notes)])


def verify_checkpoint(folder: Path) -> Report:
    """Verify a source checkpoint folder (see module docstring)."""
    files = scan_checkpoint(folder)
    model = plan_model(files, read_neox_config(files))
    engine = read_engine_state(files, exported_module=True)
    partitions = Check("partitions")
    coverage = Check("coverage")
    invariant = Check("master->model")
    try:
        optimizer = plan_optimizer(files, model, engine, render_files=False)
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
                _compare_param(invariant, name, param, shards[layer][tp][key])
    elif files.optim_files:
        invariant.failures.append("optimizer state could not be read (see partitions)")
    if not files.optim_files:
        partitions.skipped = invariant.skipped = "no optimizer state"
    return Report(folder, [partitions, coverage, invariant])


#: Elements of a source checkpoint's parameter compared at a time (16 MB of fp32 master
#: weights): ``verify`` holds about one such piece, whatever the parameter's size.
COMPARE_ELEMENTS = 4 << 20


def _compare_param(check: Check, name: str, param: ParamSlices, model: TensorRef) -> None:
    """:func:`_compare` of a parameter's fp32 master weights (read from its partitions) and
    its model weight (a tensor of a model file), :data:`COMPARE_ELEMENTS` at a time; a
    difference is counted over the whole tensor in a second pass."""
    if tuple(param.shape) != tuple(model.shape):
        check.failures.append(f"{name}: master shape {list(param.shape)} != model {list(model.shape)}")
        return
    segments = param.segments["master"]
    master_dtype = segments.first.dtype if segments else float32

    def pieces() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, model.numel, COMPARE_ELEMENTS):
            count = min(COMPARE_ELEMENTS, model.numel - start)
            yield (to_torch(param.read_range("master", start, count), master_dtype),
                   to_torch(model.read_range(start, count), model.dtype))

    if all(_bitwise_equal(master.to(weight.dtype), weight) for master, weight in pieces()):
        check.passed += 1
        return
    differ = sum(int((master.to(weight.dtype) != weight).sum()) for master, weight in pieces())
    check.failures.append(_differs(name, model.dtype.torch, differ, model.numel))


def _compare(check: Check, name: str, master: torch.Tensor, model: torch.Tensor,
             source_dtype: torch.dtype | None = None) -> None:
    """Count ``name`` as passed when ``master`` cast to ``source_dtype`` (the training model's
    dtype; None: the model weight's own), then to the model weight's dtype, equals it bitwise."""
    via = source_dtype if source_dtype is not None else model.dtype
    cast = master.to(via).to(model.dtype)
    if cast.shape != model.shape:
        check.failures.append(f"{name}: master shape {list(cast.shape)} != model {list(model.shape)}")
    elif _bitwise_equal(cast, model):
        check.passed += 1
    else:
        check.failures.append(_differs(name, via, int((cast != model).sum()), model.numel(),
                                       model.dtype))


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)


def _differs(name: str, via: torch.dtype, differ: int, numel: int,
             model_dtype: torch.dtype | None = None) -> str:
    path = " then ".join(dict.fromkeys(dtype_name(d) for d in (via, model_dtype or via)))
    return f"{name}: master cast to {path} differs from the model weight in {differ} of {numel} elements"


def _raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


class _TensorFiles:
    """The tensors of some safetensors (or compressed tensor) files of a step folder, by name,
    each read when asked for: a step's model weights are compared one at a time with their
    masters, not all held at once."""

    def __init__(self, paths: list[Path], folder: Path) -> None:
        self.names: dict[str, Path] = {}
        for path in paths:
            path = resolve_inside(folder, path.relative_to(folder).as_posix(), str(folder))
            if path.name.endswith(".zst"):
                from exporter.convert.compress import read_compressed_index

                keys = [key for key in read_compressed_index(path) if not key.startswith("__")]
            else:
                with open(path, "rb") as fh:  # refused here, not by safe_open's own error
                    keys = sorted(read_safetensors_header(fh, str(path)).entries)  # safe_open's order
            self.names.update(dict.fromkeys(keys, path))

    def tensor(self, name: str) -> torch.Tensor:
        path = self.names[name]
        if path.name.endswith(".zst"):
            from exporter.convert.compress import read_compressed_tensor

            return read_compressed_tensor(path, name)
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)


def verify_export(folder: Path) -> Report:
    """Verify a step folder written by ``convert``/``build`` (and its index rows, if in an archive)."""
    invariant = Check("master->model")
    hashes = Check("hashes")
    coverage = Check("coverage")
    master_file = folder / KIND_FILES["master"]
    if not master_file.exists() and (folder / compressed(KIND_FILES["master"])).exists():
        master_file = folder / compressed(KIND_FILES["master"])
    model_paths = model_files(folder)
    root, step = archive_of_step_dir(folder), folder_step(folder.name)
    pushed = read_push_record(root, step) if root is not None and step is not None else None
    on_hub = {p for p in (pushed.deleted if pushed else {}) if not (root / p).exists()}
    if not model_paths and not any(Path(p).name.startswith("model") for p in on_hub):
        coverage.failures.append(f"{folder}: no model.safetensors")
    model = _TensorFiles(model_paths, folder)  # each weight read when its master is
    coverage.passed += len(model.names)
    tp_size = _tp_size(folder)
    source_dtype = _source_dtype(folder, model_paths)
    if master_file.exists():
        masters = _TensorFiles([master_file], folder)
        for name in masters.names:
            if name not in model.names:
                if not on_hub:  # else the model weights are on the Hub only
                    coverage.failures.append(f"{name}: master weight without a model weight")
            elif tp_size > 1 and hf_merge_rule(name) in (Merge.SUM, Merge.AVERAGE, Merge.ROW_BIAS):
                # Summed / averaged shards round differently from their masters: checked on
                # the source checkpoint instead (verify CHECKPOINT_DIR).
                continue
            else:
                _compare(invariant, name, masters.tensor(name), model.tensor(name), source_dtype)
    rows = _index_rows(folder)
    remote_rows = 0
    for row in rows:
        if row["file"] in on_hub:
            remote_rows += 1
            continue
        root = folder.parent.parent  # rows only exist inside an archive
        if not resolve_inside(root, row["file"], str(root)).is_file():
            hashes.failures.append(f"{row['kind']} {row['name']}: {row['file']} is missing")
            continue
        data = _row_bytes(root, row)
        algorithm, digest = index_digest(row)
        if tensor_digest(algorithm, data) == digest:
            hashes.passed += 1
        else:
            hashes.failures.append(
                f"{row['kind']} {row['name']}: {algorithm} does not match the index")
    if not master_file.exists():
        invariant.skipped = "no optimizer state"
    if not rows:
        hashes.skipped = ("no index: a step folder outside an archive (verify the archive to "
                          "check hashes)" if archive_of_step_dir(folder) is None
                          else "no index shard for this step")
    notes = []
    if pushed is not None and on_hub:
        where = f"hf://datasets/{pushed.repo_id} at {pushed.commit or pushed.revision}"
        notes.append(f"step {step} lives only on the Hub for {len(on_hub)} file(s) "
                     f"({remote_rows} tensors), removed here after a verified push: {where}; "
                     f"not checked locally")
    return Report(folder, [coverage, invariant, hashes], notes)


def _source_dtype(step_folder: Path, model_paths: list[Path]) -> torch.dtype | None:
    """The dtype of the source checkpoint's model weights (None: not recorded, taken to be
    the written one): the checkpoint index's ``model_dtype`` in an archive, else the
    ``source_dtype`` metadata that :mod:`exporter.pipeline.export` writes into model files."""
    import pyarrow.parquet as pq

    root, step = archive_of_step_dir(step_folder), folder_step(step_folder.name)
    shard = checkpoint_index_path(root, step) if root is not None and step is not None else None
    name = None
    if shard is not None and shard.exists():
        rows = pq.read_table(shard, columns=["model_dtype"]).to_pylist()
        name = rows[0]["model_dtype"] if rows else None
    elif model_paths:
        name = _metadata(model_paths[0]).get(SOURCE_DTYPE_KEY)
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ArchiveError(f"{step_folder}: recorded source dtype {name!r} is not a torch dtype")
    return dtype


def _metadata(path: Path) -> dict[str, str]:
    """The string metadata of a (plain or compressed) safetensors file."""
    if path.name.endswith(".zst"):
        from exporter.convert.compress import read_compressed_index

        return dict(read_compressed_index(path).get("__metadata__") or {})
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _row_bytes(root: Path, row: dict) -> bytes:
    """The bytes of an index row, read once the file's header agrees with the row."""
    index_label = f"{root}/{tensor_index_file(row['step'])}"
    path = resolve_inside(root, row["file"], index_label)
    file_label = str(path)
    if path.name.endswith(".zst"):
        from exporter.convert.compress import read_compressed_header, read_compressed_tensor

        check_row(row, read_compressed_header(path), index_label, file_label)
        return _raw(read_compressed_tensor(path, row["name"]))
    with open(path, "rb") as fh:
        check_row(row, read_safetensors_header(fh, file_label), index_label, file_label)
        fh.seek(row["data_offset_begin"])
        return fh.read(row["data_offset_end"] - row["data_offset_begin"])


def _tp_size(step_folder: Path) -> int:
    rows = _index_rows(step_folder, "checkpoints")
    if rows and rows[0].get("tp_size"):
        return int(rows[0]["tp_size"])
    state = step_folder / STATE_JSON
    if state.exists():
        data = read_json(resolve_inside(step_folder, STATE_JSON, str(step_folder)), str(state))
        engine = data.get("engine", {}) if isinstance(data, dict) else {}
        return max(1, len(engine)) if isinstance(engine, (dict, list)) else 1
    return 1


def _index_rows(step_folder: Path, table: str = "tensors") -> list[dict]:
    """The rows of the step's shard of one index table, when the folder is in an archive;
    read through the archive's checks (paths inside the root, the committed schema)."""
    root, step = archive_of_step_dir(step_folder), folder_step(step_folder.name)
    if root is None or step is None:
        return []
    relative = tensor_index_file(step) if table == "tensors" else checkpoint_index_file(step)
    if not (root / relative).exists():
        return []
    return read_shard(resolve_inside(root, relative, str(root)), f"{root}/{relative}").to_pylist()


def verify_path(path: str | Path) -> list[Report]:
    """Verify a checkpoint folder, a step folder, or every step of an archive.

    Returns:
        One report per target (each step of an archive), with its named checks.

    Raises:
        ExporterError: ``path`` is not a folder, or an archive with no complete step.

    Example (the archive of :func:`exporter.build`'s example):
        >>> from exporter import verify_path
        >>> reports = verify_path("archive")
        >>> [(report.target.name, report.ok) for report in reports]
        [('step0', True), ('step8', True)]
        >>> [check.name for check in verify_path("runs/tiny/step8")[0].checks]
        ['partitions', 'coverage', 'master->model']
    """
    path = Path(path)
    if not path.is_dir():
        raise ExporterError(f"{path}: not a folder")
    if is_archive(path):
        label = str(manifest_path(path))
        manifest = validate_manifest(
            read_json(resolve_inside(path, MANIFEST, str(path)), label), label)
        steps = sorted(int(s) for s in manifest["steps"])
        if not steps:
            raise ExporterError(f"{path}: archive has no complete steps")
        return [verify_export(resolve_inside(path, step_prefix(s), str(path))) for s in steps]
    if (path / CONFIG).exists() or model_files(path):
        return [verify_export(path)]
    return [verify_checkpoint(path)]
