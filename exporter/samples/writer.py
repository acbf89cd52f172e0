"""Writes one checkpoint folder in the Pythia-era layout from a source of tensors.

File names and contents follow DeeperSpeed eb7f5cff:
- ``deepspeed/runtime/pipe/module.py`` ``PipelineModule.ckpt_layer_path`` / ``save_state_dict``:
  ``layer_{idx:02d}-model_{tp:02d}-model_states.pt``, a plain ``dict`` of ``.cpu()`` tensors
  (``layer.state_dict()``: parameters and persistent buffers), written by data-parallel rank 0.
- ``deepspeed/runtime/engine.py`` ``_get_ckpt_name`` / ``_save_checkpoint``:
  ``mp_rank_{tp:02d}_model_states.pt``; ``_get_rank_zero_ckpt_name`` / ``_save_zero_checkpoint``:
  ``zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt`` holding ``optimizer_state_dict`` and
  ``param_shapes`` (``OrderedDict`` of every module parameter name -> ``torch.Size``, in
  ``named_parameters()`` order, not split by group).
- ``deepspeed/runtime/zero/stage1.py`` ``_elastic_state_dict``: see ``optimizer_state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from exporter.records import OPTIMIZER_KINDS
from exporter.samples.pickling import DynamicLossScaler, save_legacy
from exporter.samples.shapes import (
    ROTARY_BUFFER,
    ROTARY_BUFFER_AFTER,
    ModelShape,
    ParamSpec,
    SampleSpecError,
    parameter_specs,
)
from exporter.samples.state import EngineState, RunConfig, mp_rank_state, neox_config_text
from exporter.samples.zero import GroupPartition, partition_group

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # FusedAdam keeps ``step`` in the param group
GPUS_PER_NODE = 8
LayerContainer = Literal["dict", "ordered"]


class TensorSource(Protocol):
    """Where a checkpoint's fp32 values come from (trained tensors or seeded random data)."""

    def fill(self, kind: str, tp_rank: int, spec: ParamSpec, start: int, out: torch.Tensor) -> None:
        """Write elements ``[start, start + out.numel())`` of the flattened ``kind`` tensor of
        ``spec`` into the fp32 1-D ``out``."""
        ...


def read_flat(source: TensorSource, kind: str, tp_rank: int, spec: ParamSpec) -> torch.Tensor:
    """A whole parameter's ``kind`` tensor from ``source``, flat fp32."""
    out = torch.empty(spec.numel)
    source.fill(kind, tp_rank, spec, 0, out)
    return out


def layer_file_name(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_file_name(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def optim_file_name(dp_rank: int, tp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


def rotary_inv_freq(shape: ModelShape) -> torch.Tensor:
    """GPT-NeoX ``RotaryEmbedding.__init__``'s buffer, fp32 (the engine casts it with the model)."""
    dim = shape.rotary_ndims
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))


def group_partitions(
    shape: ModelShape, tp: int, tp_rank: int, dp: int, max_elements_per_comm: int
) -> tuple[GroupPartition, GroupPartition]:
    """The two stage-1 param groups (decay, no decay) of one tensor-parallel rank."""
    specs = parameter_specs(shape, tp, tp_rank)
    return tuple(  # type: ignore[return-value]
        partition_group(
            group,
            [s.name for s in specs if s.group == group],
            [s.numel for s in specs if s.group == group],
            dp,
            max_elements_per_comm,
        )
        for group in (0, 1)
    )


@dataclass(frozen=True)
class CheckpointTruth:
    """Ground truth of one written checkpoint, held in memory or regenerated on demand.

    Tensors are addressed by module name (``2.attention.dense.weight``) and tp rank.
    """

    folder: Path
    shape: ModelShape
    iteration: int
    dp: int
    tp: int
    dtype: torch.dtype
    global_steps: int
    skipped_steps: int
    adam_step: int  # Adam's step count; no file stores it (see EngineState.adam_step)
    lr: float  # the lr the scheduler holds, i.e. the next step's
    loss_scale: float
    partitions: dict[int, tuple[GroupPartition, GroupPartition]]
    files: tuple[str, ...]  # paths relative to ``folder``
    source: TensorSource = field(repr=False, compare=False)

    def specs(self, tp_rank: int = 0) -> list[ParamSpec]:
        """Parameters of one tp rank in ``param_shapes`` order."""
        return parameter_specs(self.shape, self.tp, tp_rank)

    def spec(self, name: str, tp_rank: int = 0) -> ParamSpec:
        for spec in self.specs(tp_rank):
            if spec.name == name:
                return spec
        raise SampleSpecError(f"no parameter named {name!r}")

    def tensor(self, kind: str, name: str, tp_rank: int = 0) -> torch.Tensor:
        """fp32 ``master``, ``exp_avg`` or ``exp_avg_sq`` of one parameter, shaped."""
        if kind not in OPTIMIZER_KINDS:
            raise SampleSpecError(f"unknown kind {kind!r}; expected one of {OPTIMIZER_KINDS}")
        spec = self.spec(name, tp_rank)
        return read_flat(self.source, kind, tp_rank, spec).reshape(spec.shape)

    def master(self, name: str, tp_rank: int = 0) -> torch.Tensor:
        return self.tensor("master", name, tp_rank)

    def exp_avg(self, name: str, tp_rank: int = 0) -> torch.Tensor:
        return self.tensor("exp_avg", name, tp_rank)

    def exp_avg_sq(self, name: str, tp_rank: int = 0) -> torch.Tensor:
        return self.tensor("exp_avg_sq", name, tp_rank)

    def weight(self, name: str, tp_rank: int = 0) -> torch.Tensor:
        """The layer-file tensor: the master cast to the model dtype, or the rotary buffer."""
        if name.endswith("." + ROTARY_BUFFER):
            return rotary_inv_freq(self.shape).to(self.dtype)
        return self.master(name, tp_rank).to(self.dtype)


def _fill(
    buffer: torch.Tensor,
    kind: str,
    source: TensorSource,
    tp_rank: int,
    specs: dict[str, ParamSpec],
    part: GroupPartition,
    start: int,
    stop: int,
) -> None:
    """Copy the flat group's elements ``[start, stop)`` into ``buffer[: stop - start]``."""
    for name, (offset, numel) in part.offsets().items():
        lo, hi = max(start, offset), min(stop, offset + numel)
        if lo < hi:
            source.fill(kind, tp_rank, specs[name], lo - offset, buffer[lo - start : hi - start])


def optimizer_state_dict(
    source: TensorSource,
    tp_rank: int,
    dp_rank: int,
    specs: dict[str, ParamSpec],
    partitions: tuple[GroupPartition, ...],
    engine: EngineState,
) -> dict[str, Any]:
    """``FP16_DeepSpeedZeroOptimizer_Stage1._elastic_state_dict()`` of one dp rank.

    Each sub-partition is a full-size fp32 buffer (zero padding included) saved as a
    ``[:lean]`` view, as ``_get_groups_without_padding`` / ``_get_state_without_padding`` do:
    the file's storages keep the padding, the tensors do not.
    """
    fp32_groups: list[list[torch.Tensor]] = []
    base_state: list[list[dict[str, torch.Tensor]]] = []
    for part in partitions:
        masters, states = [], []
        for comm in range(part.num_comm_intervals):
            start, stop = part.lean_range(dp_rank, comm)
            lean = stop - start
            buffers = {kind: torch.empty(part.sub_partition_size) for kind in OPTIMIZER_KINDS}
            for kind, buffer in buffers.items():
                _fill(buffer, kind, source, tp_rank, specs, part, start, stop)
                buffer[lean:] = 0  # alignment padding: zeros in stage 1's flat buffers
            # The fp32 sub-partitions are trainable leaves in stage 1's __init__.
            masters.append(buffers["master"].requires_grad_()[:lean])
            states.append({key: buffers[key][:lean] for key in ADAM_STATE_KEYS})
        fp32_groups.append(masters)
        base_state.append(states)
    return {
        "loss_scaler": engine.loss_scaler,
        "dynamic_loss_scale": isinstance(engine.loss_scaler, DynamicLossScaler),
        "overflow": engine.overflow,
        "base_optimizer_state": base_state,
        "zero_stage": 1,  # ZERO_OPTIMIZATION_OPTIMIZER_STATES
        "partition_count": partitions[0].dp,
        "num_comm_intervals_per_group": [p.num_comm_intervals for p in partitions],
        "local_sub_partitions_of_fp32_groups": fp32_groups,
    }


@dataclass(frozen=True)
class FolderSpec:
    """Everything that fixes one checkpoint folder besides its tensor values."""

    shape: ModelShape
    config: RunConfig
    iteration: int
    dp: int
    tp: int
    dtype: torch.dtype
    seed: int
    config_file: str  # relative path of the GPT-NeoX config inside the folder
    layer_container: LayerContainer = "dict"
    cuda_storage_tags: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise SampleSpecError("Pythia-era stage-1 checkpoints are fp16 or bf16")
        if self.dp < 1 or self.tp < 1 or self.iteration < 0:
            raise SampleSpecError("dp and tp must be >= 1 and the iteration >= 0")
        if self.layer_container not in ("dict", "ordered"):
            raise SampleSpecError("layer_container must be 'dict' or 'ordered'")


def write_folder(
    folder: Path,
    spec: FolderSpec,
    source: TensorSource,
    engine: EngineState,
    *,
    adam_step: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> CheckpointTruth:
    """Write every file of one checkpoint, one file's tensors in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    files: list[str] = []

    def save(obj: Any, name: str, location: str | None = None) -> None:
        save_legacy(obj, folder / name, storage_location=location)
        files.append(name)
        if progress is not None:
            progress(name)

    container: Callable[[], dict[str, torch.Tensor]] = (
        OrderedDict if spec.layer_container == "ordered" else dict
    )
    partitions: dict[int, tuple[GroupPartition, GroupPartition]] = {}
    for tp_rank in range(spec.tp):
        specs = parameter_specs(spec.shape, spec.tp, tp_rank)
        for layer in spec.shape.layer_indices():
            entries = container()
            for param in (s for s in specs if s.layer == layer):
                master = read_flat(source, "master", tp_rank, param)
                entries[param.key] = master.reshape(param.shape).to(spec.dtype)
                if param.key == ROTARY_BUFFER_AFTER:
                    entries[ROTARY_BUFFER] = rotary_inv_freq(spec.shape).to(spec.dtype)
            save(entries, layer_file_name(layer, tp_rank))
        state = mp_rank_state(
            spec.shape,
            spec.config,
            engine,
            iteration=spec.iteration,
            dp=spec.dp,
            tp=spec.tp,
            tp_rank=tp_rank,
            seed=spec.seed,
        )
        save(state, mp_rank_file_name(tp_rank))
        parts = group_partitions(
            spec.shape, spec.tp, tp_rank, spec.dp, spec.config.max_elements_per_comm
        )
        partitions[tp_rank] = parts
        by_name = {s.name: s for s in specs}
        param_shapes = OrderedDict((s.name, torch.Size(s.shape)) for s in specs)
        for dp_rank in range(spec.dp):
            osd = optimizer_state_dict(source, tp_rank, dp_rank, by_name, parts, engine)
            # Global rank in PipeModelDataParallelTopology (axes pipe, data, model).
            gpu = (dp_rank * spec.tp + tp_rank) % GPUS_PER_NODE
            location = f"cuda:{gpu}" if spec.cuda_storage_tags else None
            save(
                {"optimizer_state_dict": osd, "param_shapes": param_shapes},
                optim_file_name(dp_rank, tp_rank),
                location,
            )
    config_path = folder / spec.config_file
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_name(f".{config_path.name}.partial")
    tmp.write_text(neox_config_text(spec.shape, spec.config, tp=spec.tp, dtype=spec.dtype,
                                    seed=spec.seed))
    tmp.replace(config_path)
    files.append(spec.config_file)
    return CheckpointTruth(
        folder=folder,
        shape=spec.shape,
        iteration=spec.iteration,
        dp=spec.dp,
        tp=spec.tp,
        dtype=spec.dtype,
        global_steps=engine.global_steps,
        skipped_steps=engine.skipped_steps,
        adam_step=engine.adam_step if adam_step is None else adam_step,
        lr=spec.config.lr_at(engine.scheduler_steps),
        loss_scale=float(engine.loss_scaler.cur_scale),
        partitions=partitions,
        files=tuple(files),
        source=source,
    )
