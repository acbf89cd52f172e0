"""Public entry points: one checkpoint folder, or a small run of checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch

from exporter.samples.shapes import ModelShape, SampleSpecError
from exporter.samples.state import EngineState, RunConfig, simulated_engine
from exporter.samples.synthetic import SyntheticSource
from exporter.samples.training import MemorySource, train
from exporter.samples.writer import CheckpointTruth, FolderSpec, LayerContainer, write_folder

Layout = Literal["branches", "global_step"]


def tiny_run_config(last_step: int, **overrides: object) -> RunConfig:
    """Hyper-parameters for a few real steps of a tiny model.

    Pythia's values except: a schedule as long as the run (so the lr moves), a larger lr, two
    sequences per GPU, and an initial loss scale of 2**20 with a window of 4 steps, so the
    first steps overflow fp16 and are skipped and the scale then grows again, as in a real run.
    """
    values: dict[str, object] = {
        "lr": 1e-3,
        "min_lr": 1e-4,
        "train_iters": max(1, last_step),
        "micro_batch_size": 2,
        "initial_scale_power": 20,
        "loss_scale_window": 4,
    }
    values.update(overrides)
    return RunConfig(**values)  # type: ignore[arg-type]


def _config_file(shape: ModelShape, layout: Layout) -> str:
    # GPT-NeoX save_ds_checkpoint writes the configs under {tag}/configs/; the Hub branches
    # of the raw Pythia checkpoints keep the yml at the top of each branch.
    return f"configs/{shape.name}.yml" if layout == "global_step" else f"{shape.name}.yml"


def write_checkpoint(
    folder: str | Path,
    shape: ModelShape,
    *,
    step: int = 1000,
    dp: int = 4,
    tp: int = 1,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    train_steps: int = 0,
    config: RunConfig | None = None,
    layer_container: LayerContainer = "dict",
    cuda_storage_tags: bool = False,
    config_file: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> CheckpointTruth:
    """Write one Pythia-era checkpoint folder and return its ground truth.

    Args:
        folder: the folder to fill (created if missing); it holds the files directly.
        shape: model dimensions, e.g. ``TINY``, ``PYTHIA_160M``, ``PYTHIA_410M``.
        step: the iteration the checkpoint claims (engine counters, lr, loss scale follow it).
            Ignored when ``train_steps`` > 0.
        dp, tp: data- and tensor-parallel sizes (``dp`` optimizer files per tp rank).
        dtype: model dtype of the layer files (``torch.float16``; ``torch.bfloat16`` as in
            pythia-1b).
        seed: fixes every value.
        train_steps: 0 writes seeded random values without training (any size, streamed one
            file at a time); n > 0 trains the model for n real steps first (small shapes).
        config: hyper-parameters and ``max_elements_per_comm``; Pythia's when None (or
            ``tiny_run_config`` when training).
        layer_container: ``"dict"`` (as DeeperSpeed eb7f5cff writes) or ``"ordered"``
            (``OrderedDict``, as other versions do).
        cuda_storage_tags: tag optimizer-file storages ``cuda:N`` as files saved from GPUs
            are; loading them then needs ``map_location``.
        config_file: relative path of the yml; ``<shape.name>.yml`` by default.
        progress: called with each file name once written.

    Returns:
        The ``CheckpointTruth`` of the folder.

    Example:
        >>> import tempfile
        >>> from exporter.samples import TINY, write_checkpoint
        >>> truth = write_checkpoint(tempfile.mkdtemp(), TINY, step=8, dp=2)
        >>> truth.master("2.attention.dense.weight").shape
        torch.Size([32, 32])
    """
    folder = Path(folder)
    training = train_steps > 0
    template = FolderSpec(
        shape=shape,
        config=config or (tiny_run_config(train_steps) if training else RunConfig()),
        iteration=train_steps if training else step,
        dp=dp,
        tp=tp,
        dtype=dtype,
        seed=seed,
        config_file=config_file or _config_file(shape, "branches"),
        layer_container=layer_container,
        cuda_storage_tags=cuda_storage_tags,
    )
    if training:
        return _trained(template, [train_steps], lambda _: folder, progress)[train_steps]
    source = SyntheticSource(shape, seed, dtype, step0=step == 0)
    engine = simulated_engine(template.config, dtype, step)
    return write_folder(folder, template, source, engine, progress=progress)


def write_run(
    folder: str | Path,
    shape: ModelShape,
    steps: Iterable[int] = (0, 1, 2, 4, 8),
    *,
    layout: Layout = "branches",
    dp: int = 4,
    tp: int = 1,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    config: RunConfig | None = None,
    layer_container: LayerContainer = "dict",
    cuda_storage_tags: bool = False,
) -> dict[int, CheckpointTruth]:
    """Train a small model and write a checkpoint at each of ``steps``.

    ``layout="branches"`` writes ``step{N}/`` folders with ``<name>.yml`` inside, as the Hub
    branches of the raw Pythia checkpoints; ``layout="global_step"`` writes what GPT-NeoX
    writes into its save folder: ``global_step{N}/`` (config under ``configs/``) and a
    ``latest`` file naming the last tag (DeeperSpeed ``engine.py`` ``save_checkpoint``).

    Example:
        >>> import tempfile
        >>> from exporter.samples import TINY, write_run
        >>> truths = write_run(tempfile.mkdtemp(), TINY, steps=[0, 2], dp=2)
        >>> sorted(truths), truths[2].global_steps
        ([0, 2], 2)
    """
    folder = Path(folder)
    wanted = sorted(set(steps))
    if not wanted or wanted[0] < 0:
        raise SampleSpecError("steps must be a non-empty list of iterations >= 0")
    if layout not in ("branches", "global_step"):
        raise SampleSpecError("layout must be 'branches' or 'global_step'")
    prefix = "step" if layout == "branches" else "global_step"
    template = FolderSpec(
        shape=shape,
        config=config or tiny_run_config(wanted[-1]),
        iteration=0,
        dp=dp,
        tp=tp,
        dtype=dtype,
        seed=seed,
        config_file=_config_file(shape, layout),
        layer_container=layer_container,
        cuda_storage_tags=cuda_storage_tags,
    )
    truths = _trained(template, wanted, lambda step: folder / f"{prefix}{step}", None)
    if layout == "global_step":
        latest = folder / "latest"
        tmp = folder / ".latest.partial"
        tmp.write_text(f"global_step{wanted[-1]}")
        tmp.replace(latest)
    return truths


def _trained(
    template: FolderSpec,
    steps: list[int],
    folder_of: Callable[[int], Path],
    progress: Callable[[str], None] | None,
) -> dict[int, CheckpointTruth]:
    """Train once, writing ``folder_of(step)`` after each of ``steps``."""
    truths: dict[int, CheckpointTruth] = {}

    def snapshot(step: int, engine: EngineState, source: MemorySource, adam_step: int) -> None:
        spec = dataclasses.replace(template, iteration=step)
        truths[step] = write_folder(
            folder_of(step), spec, source, engine, adam_step=adam_step, progress=progress
        )

    train(
        template.shape,
        tp=template.tp,
        dp=template.dp,
        dtype=template.dtype,
        seed=template.seed,
        config=template.config,
        snapshot_steps=steps,
        snapshot=snapshot,
    )
    return truths
