"""Export one checkpoint folder into a step folder of the archive layout.

    step folder/
      config.json                 transformers GPTNeoXConfig
      model.safetensors           model weights under Hugging Face names (sharded above a limit)
      buffers.safetensors         persistent buffers (rotary inv_freq), Hugging Face names
      optimizer/{master,exp_avg,exp_avg_sq}.safetensors   fp32 master weights and Adam moments
      state.json                  every non-tensor value of the engine and optimizer state
      state.safetensors           tensor-valued engine state (rng states ...)
      neox.yml                    the source config

Everything is written into a temporary sibling folder that is renamed into place when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from exporter.archive.layout import (
    BUFFERS,
    CONFIG,
    KIND_FILES,
    MODEL_SHARD_INDEX,
    NEOX_CONFIG,
    SOURCE_DTYPE_KEY,
    STATE_JSON,
    STATE_TENSORS,
    compressed,
    model_shard_files,
)
from exporter.convert.sharding import plan_shards
from exporter.convert.stream import Converter, FileTask, available_cores
from exporter.dtypes import DType, as_dtype, bfloat16, float16, float32
from exporter.errors import ExporterError, OptionsError
from exporter.files import partial_dir, write_json_atomic
from exporter.neox.arch import model_config, model_notes
from exporter.neox.checkpoint import CheckpointFiles, scan_checkpoint
from exporter.neox.config import read_neox_config
from exporter.neox.model import ModelPlan, plan_model
from exporter.neox.state import EngineState, read_engine_state
from exporter.neox.zero import OptimizerPlan, forked_reading, plan_optimizer
from exporter.records import TensorJob, WrittenRecord, dtype_name, element_size
from exporter.torchfile import paused_collector
from exporter.torchfile.forked import ForkedLoads

INCLUDE_CHOICES = ("model", "optimizer", "state")
#: Output dtypes of ``--dtype`` (None keeps the source's).
OUTPUT_DTYPES = (float32, bfloat16, float16)
log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class ExportOptions:
    """What to write and how; checked when made, before any file is touched.

    Attributes:
        include: subset of ``INCLUDE_CHOICES``.
        dtype: output dtype of model weights, one of ``OUTPUT_DTYPES`` (None keeps the
            source's), given as a name (``"bfloat16"``), a ``torch.dtype`` or an
            :class:`exporter.dtypes.DType`.
        compress_level: write tensor files as byte-shuffled zstd (``.safetensors.zst``,
            :mod:`exporter.convert.compress`) at this level (1-22); None writes plain
            safetensors.
        device: where casts and statistics run (``cpu``, ``cuda``, ``cuda:N``).
        max_shard_size: model shards are split above this many bytes.
        statistics: compute per-tensor statistics (False: the index columns are null).

    Raises:
        OptionsError: a value the export cannot use, named.
    """

    include: tuple[str, ...] = INCLUDE_CHOICES
    dtype: DType | None = None
    device: str = "cpu"
    max_shard_size: int = DEFAULT_SHARD_SIZE
    compress_level: int | None = None
    statistics: bool = True

    def __post_init__(self) -> None:
        self.include = tuple(self.include)
        unknown = sorted(set(self.include) - set(INCLUDE_CHOICES))
        if unknown or not self.include:
            raise OptionsError(f"include: unknown or no parts {unknown or list(self.include)} "
                               f"(choose from {', '.join(INCLUDE_CHOICES)})")
        if self.dtype is not None:
            try:
                self.dtype = as_dtype(self.dtype)
            except ValueError:
                pass  # refused just below, by name
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise OptionsError(f"dtype: {self.dtype} is not an output dtype "
                               f"({', '.join(map(str, OUTPUT_DTYPES))} or None)")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise OptionsError(f"device: {self.device!r} (use cpu, cuda or cuda:N)")
        if not isinstance(self.max_shard_size, int) or self.max_shard_size < 1:
            raise OptionsError(f"max_shard_size: must be a positive number of bytes, "
                               f"got {self.max_shard_size!r}")
        if self.compress_level is not None and not 1 <= self.compress_level <= 22:
            raise OptionsError(f"compress_level: zstd levels are 1-22, got {self.compress_level}")

    def manifest_entry(self) -> dict[str, Any]:
        """The options as the manifest records them (a rebuild must use the same)."""
        entry: dict[str, Any] = {
            "include": list(self.include),
            "dtype": dtype_name(self.dtype) if self.dtype else None,
            "compress": (f"zstd:{self.compress_level}"
                         if self.compress_level is not None else None)}
        if not self.statistics:  # recorded only when off: older manifests stay equal
            entry["statistics"] = False
        return entry


@dataclass
class ExportResult:
    """What one export wrote."""

    out_dir: Path
    records: list[WrittenRecord]
    engine: EngineState
    model: ModelPlan
    optimizer: OptimizerPlan | None
    source_files: list[Path]
    bytes_in: int
    bytes_out: int
    seconds: float
    file_sha256: dict[str, str]


def export_checkpoint(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ExportOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Convert checkpoint folder ``source`` into step folder ``out_dir``.

    Args:
        source: a folder with ``layer_*``/``mp_rank_*``/``zero_pp_rank_*`` files and a YAML config.
        out_dir: the step folder to create (must not exist, or be empty).
        options: what to include, output dtype, device.
        progress: called with the number of source bytes processed, as they are.

    Returns:
        The written tensors with their hashes and statistics, and the engine state.

    Raises:
        ExporterError: bad input (the message names the file); nothing is left at ``out_dir``.

    Example (a sample run written by ``neox-export sample runs/tiny``):
        >>> from exporter import ExportOptions, export_checkpoint
        >>> result = export_checkpoint("runs/tiny/step8", "hf/step8")
        >>> sorted({record.job.kind for record in result.records})
        ['buffer', 'exp_avg', 'exp_avg_sq', 'master', 'model', 'state']
        >>> weights = export_checkpoint("runs/tiny/step8", "hf/step8-bf16",
        ...                             ExportOptions(include=("model",), dtype="bfloat16"))
        >>> {record.dtype.name for record in weights.records if record.job.kind == "model"}
        {'bfloat16'}
    """
    options = options or ExportOptions()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExporterError(f"{out_dir}: output folder exists and is not empty")
    files = scan_checkpoint(source)
    cfg = read_neox_config(files)
    model = plan_model(files, cfg)
    engine = read_engine_state(files, exported_module="model" in options.include)
    converter = Converter(dtype=options.dtype, device=options.device, progress=progress,
                          statistics=options.statistics)

    tmp = partial_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    optimizer = None
    try:
        optimizer, records = _plan_and_write(tmp, files, cfg, model, engine, options, converter)
        hashes = {f.path: f.sha256 for f in converter.written_files}
        if options.compress_level is not None:
            hashes = _compress(tmp, records, hashes, options.compress_level)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bytes_out = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    used = files.all_files()
    return ExportResult(
        out_dir=out_dir,
        records=records,
        engine=engine,
        model=model,
        optimizer=optimizer,
        source_files=used,
        bytes_in=sum(p.stat().st_size for p in used),
        bytes_out=bytes_out,
        seconds=time.perf_counter() - start,
        file_sha256=hashes,
    )


def _plan_and_write(
    tmp: Path,
    files: CheckpointFiles,
    cfg: dict[str, Any],
    model: ModelPlan,
    engine: EngineState,
    options: ExportOptions,
    converter: Converter,
) -> tuple[OptimizerPlan | None, list[WrittenRecord]]:
    """Plan the optimizer state and write every file; the model's files are written while
    the optimizer is planned (reading pickles takes one core and the GIL; writing is hashing
    and I/O, which release it), the optimizer's as soon as it is."""
    model_tasks = _model_tasks(tmp, cfg, model, options, converter)
    if "optimizer" not in options.include:
        return None, _write_rest(tmp, files, cfg, model, engine, None, options, converter,
                                 model_tasks)
    # Forked first, while this process runs one thread: a child reads partition files'
    # pickles while this process reads others.
    reading = forked_reading(files)
    forked = ForkedLoads.start(*reading) if reading is not None else None
    cancel = threading.Event()

    def write_model() -> list[WrittenRecord]:
        # While the optimizer is planned, on a core of its own: with two, once a core is free
        # of reading partition files, this process waiting for the child's last ones (three
        # busy threads on two cores only slowed the reading).
        if forked is not None and available_cores() <= 2:
            forked.wait_idle()
        return converter.write_files(model_tasks, tmp, cancel)

    frozen = gc.get_freeze_count()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="model-files") as pool:
            early = pool.submit(write_model)
            try:
                try:
                    # The plan's records live until its files are written: kept out of the
                    # collector's walks meanwhile (paused_collector).
                    with paused_collector(keep=True):
                        optimizer = plan_optimizer(files, model, engine, forked=forked,
                                                   render_files="state" in options.include)
                finally:
                    if forked is not None:
                        forked.close()
                if optimizer is None:
                    log.warning("%s: no ZeRO optimizer files; writing no optimizer state",
                                files.folder)
                # Started while the model's last files may still be written.
                records = _write_rest(tmp, files, cfg, model, engine, optimizer, options,
                                      converter, [], cancel)
            except BaseException as exc:
                cancel.set()
                raise _first_error(early, exc) from None
            model_records = early.result()
    finally:
        if gc.get_freeze_count() > frozen:
            gc.unfreeze()
    return optimizer, model_records + records


def _first_error(early: Future[Any], error: BaseException) -> BaseException:
    """``error``, unless it only reports that writing stopped because the model's files
    failed first: then their error."""
    stopped = isinstance(error, ExporterError) and str(error) == "writing was cancelled"
    if stopped and early.exception() is not None:
        return early.exception()  # type: ignore[return-value]
    return error


def _model_tasks(tmp: Path, cfg: dict[str, Any], model: ModelPlan, options: ExportOptions,
                 converter: Converter) -> list[FileTask]:
    tasks: list[FileTask] = []
    if "model" in options.include:
        out_dtype = options.dtype or model.dtype
        config = model_config(model, cfg, str(out_dtype).removeprefix("torch."))
        write_json_atomic(tmp / CONFIG, config)
        weights = [j for j in model.jobs if j.kind == "model"]
        metadata = {"format": "pt"}
        if out_dtype != model.dtype:
            # Cast on the way out: verify needs the training dtype to check master -> model
            # (without a cast the files are as before, and the written dtype is the source's).
            metadata[SOURCE_DTYPE_KEY] = dtype_name(model.dtype)
        tasks += _sharded(tmp, weights, converter, options.max_shard_size, metadata)
        buffers = [j for j in model.jobs if j.kind == "buffer"]
        if buffers:
            tasks.append(FileTask(tmp / BUFFERS, buffers))
    return tasks


def _write_rest(
    tmp: Path,
    files: CheckpointFiles,
    cfg: dict[str, Any],
    model: ModelPlan,
    engine: EngineState,
    optimizer: OptimizerPlan | None,
    options: ExportOptions,
    converter: Converter,
    tasks: list[FileTask],
    cancel: threading.Event | None = None,
) -> list[WrittenRecord]:
    tasks = list(tasks)
    if optimizer is not None:
        for kind, jobs in optimizer.jobs_by_kind().items():
            tasks.append(FileTask(tmp / KIND_FILES[kind], jobs))
    if "state" in options.include and (engine.tensor_jobs or model.state_jobs):
        tasks.append(FileTask(tmp / STATE_TENSORS, engine.tensor_jobs + model.state_jobs))
    _copy_config(files, cfg, tmp / NEOX_CONFIG)
    # The files are independent: written in parallel (Converter.write_files), records in order.
    records = converter.write_files(tasks, tmp, cancel)
    if "state" in options.include:
        # After the tensors: what the optimizer plan learns while its tensors stream (ranks
        # whose copies disagree) belongs in state.json.
        state = {"engine": engine.json, "model": model_notes(model)}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_json
        write_json_atomic(tmp / STATE_JSON, state)
    return records


def _compress(
    tmp: Path, records: list[WrittenRecord], hashes: dict[str, str], level: int
) -> dict[str, str]:
    """Replace each safetensors file by its ``.zst`` form; records point to the new files
    (their offsets stay those of the uncompressed layout, their sha256s those of the bytes)."""
    from exporter.convert.compress import compress_safetensors

    renamed: dict[str, str] = {}
    for rel in sorted({r.file for r in records}):
        src = tmp / rel
        dst = tmp / compressed(rel)
        compress_safetensors(src, dst, level)
        src.unlink()
        renamed[rel] = compressed(rel)
    for r in records:
        r.file = renamed.get(r.file, r.file)
    return {k: v for k, v in hashes.items() if k not in renamed}


def _sharded(
    tmp: Path, jobs: Sequence[TensorJob], converter: Converter, max_shard_size: int,
    metadata: dict[str, str],
) -> list[FileTask]:
    sizes = [math.prod(j.shape) * element_size(converter.output_dtype(j)) for j in jobs]
    groups = plan_shards(jobs, sizes, max_shard_size)
    shards = list(zip(model_shard_files(len(groups)), groups, strict=True))
    tasks = [FileTask(tmp / name, group, metadata) for name, group in shards]
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {job.name: name for name, group in shards for job in group},
        }
        write_json_atomic(tmp / MODEL_SHARD_INDEX, index)
    return tasks


def _copy_config(files: CheckpointFiles, cfg: dict[str, Any], dest: Path) -> None:
    if len(files.configs) == 1:
        shutil.copyfile(files.configs[0], dest)
    elif files.configs:
        dest.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
