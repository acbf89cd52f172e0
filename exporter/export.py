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

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from exporter.convert.sharding import plan_shards
from exporter.convert.stream import Converter, FileTask
from exporter.errors import ExporterError
from exporter.neox.checkpoint import CheckpointFiles, scan_checkpoint
from exporter.neox.config import hf_config, load_neox_config
from exporter.neox.model import ModelPlan, plan_model
from exporter.neox.state import EngineState, read_engine_state
from exporter.neox.zero import OptimizerPlan, plan_optimizer
from exporter.records import TensorJob, WrittenRecord, element_size

INCLUDE_CHOICES = ("model", "optimizer", "state")
log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class ExportOptions:
    """What to write and how.

    Attributes:
        include: subset of ``INCLUDE_CHOICES``.
        dtype: output dtype of model weights (None keeps the source's).
        compress_level: write tensor files as byte-shuffled zstd (``.safetensors.zst``,
            :mod:`exporter.convert.compress`) at this level; None writes plain safetensors.
        device: where casts and statistics run (``cpu``, ``cuda``).
        max_shard_size: model shards are split above this many bytes.
        statistics: compute per-tensor statistics (False: the index columns are null).
    """

    include: tuple[str, ...] = INCLUDE_CHOICES
    dtype: torch.dtype | None = None
    device: str = "cpu"
    max_shard_size: int = DEFAULT_SHARD_SIZE
    compress_level: int | None = None
    statistics: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.include) - set(INCLUDE_CHOICES)
        if unknown:
            raise ValueError(f"ExportOptions.include: unknown parts {sorted(unknown)}")


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
    """
    options = options or ExportOptions()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExporterError(f"{out_dir}: output folder exists and is not empty")
    files = scan_checkpoint(source)
    cfg = load_neox_config(files.configs)
    model = plan_model(files, cfg)
    engine = read_engine_state(files, exported_module="model" in options.include)
    optimizer = plan_optimizer(files, model, engine) if "optimizer" in options.include else None
    if "optimizer" in options.include and optimizer is None:
        log.warning("%s: no ZeRO optimizer files; writing no optimizer state", files.folder)
    converter = Converter(dtype=options.dtype, device=options.device, progress=progress,
                          statistics=options.statistics)

    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        records = _write_all(tmp, files, cfg, model, engine, optimizer, options, converter)
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


def _write_all(
    tmp: Path,
    files: CheckpointFiles,
    cfg: dict[str, Any],
    model: ModelPlan,
    engine: EngineState,
    optimizer: OptimizerPlan | None,
    options: ExportOptions,
    converter: Converter,
) -> list[WrittenRecord]:
    tasks: list[FileTask] = []
    if "model" in options.include:
        out_dtype = options.dtype or model.dtype
        config = hf_config(
            cfg,
            num_layers=model.num_layers,
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            torch_dtype=str(out_dtype).removeprefix("torch."),
        )
        _write_json(tmp / "config.json", config)
        weights = [j for j in model.jobs if j.kind == "model"]
        tasks += _sharded(tmp, weights, converter, options.max_shard_size)
        buffers = [j for j in model.jobs if j.kind == "buffer"]
        if buffers:
            tasks.append(FileTask(tmp / "buffers.safetensors", buffers))
    if optimizer is not None:
        for kind, jobs in optimizer.jobs_by_kind().items():
            tasks.append(FileTask(tmp / "optimizer" / f"{kind}.safetensors", jobs))
    if "state" in options.include:
        state = {"engine": engine.json}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_json
        if engine.tensor_jobs:
            tasks.append(FileTask(tmp / "state.safetensors", engine.tensor_jobs))
        _write_json(tmp / "state.json", state)
    _copy_config(files, cfg, tmp / "neox.yml")
    # The files are independent: written in parallel (Converter.write_files), records in order.
    return converter.write_files(tasks, tmp)


def _compress(
    tmp: Path, records: list[WrittenRecord], hashes: dict[str, str], level: int
) -> dict[str, str]:
    """Replace each safetensors file by its ``.zst`` form; records point to the new files
    (their offsets stay those of the uncompressed layout, their sha256s those of the bytes)."""
    from exporter.convert.compress import compress_safetensors

    renamed: dict[str, str] = {}
    for rel in sorted({r.file for r in records}):
        src = tmp / rel
        dst = src.with_name(src.name + ".zst")
        compress_safetensors(src, dst, level)
        src.unlink()
        renamed[rel] = rel + ".zst"
    for r in records:
        r.file = renamed.get(r.file, r.file)
    return {k: v for k, v in hashes.items() if k not in renamed}


def _sharded(
    tmp: Path, jobs: Sequence[TensorJob], converter: Converter, max_shard_size: int
) -> list[FileTask]:
    sizes = [math.prod(j.shape) * element_size(converter.output_dtype(j)) for j in jobs]
    shards = plan_shards(jobs, sizes, max_shard_size)
    tasks = [FileTask(tmp / name, group) for name, group in shards]
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {job.name: name for name, group in shards for job in group},
        }
        _write_json(tmp / "model.safetensors.index.json", index)
    return tasks


def _copy_config(files: CheckpointFiles, cfg: dict[str, Any], dest: Path) -> None:
    if len(files.configs) == 1:
        shutil.copyfile(files.configs[0], dest)
    elif files.configs:
        dest.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
