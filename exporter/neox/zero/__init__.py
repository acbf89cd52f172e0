"""ZeRO optimizer states: fp32 master weights and Adam moments per parameter.

Two on-disk formats are read, detected from the keys of ``optimizer_state_dict``:

- ``single_partition_of_fp32_groups``: current DeepSpeed ZeRO 1/2 (:mod:`.current`);
- ``local_sub_partitions_of_fp32_groups``: EleutherAI DeeperSpeed's elastic stage-1 format of
  the Pythia era (:mod:`.elastic`).

Each model-parallel unit (``mp_rank_XX``: a pipeline stage and/or a tensor-parallel rank) has
its own partition files; units that hold the same parameter names are the tensor-parallel
ranks of one stage and are merged with the model weights' rules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.dtypes import float32
from exporter.errors import LayoutError
from exporter.neox.checkpoint import CheckpointFiles
from exporter.neox.model import OutputRule, Shard
from exporter.neox.names import Merge, split_module_name
from exporter.neox.schedule import derived_learning_rate
from exporter.neox.zero.common import ParamSlices
from exporter.neox.zero.current import read_current
from exporter.neox.zero.elastic import prepare_file, prepared_runs, read_elastic
from exporter.neox.zero.gather import span_table
from exporter.neox.zero.order import child_share, odd_files, reading_order
from exporter.neox.zero.render import SHARED_STATE, render_partition_file
from exporter.records import OPTIMIZER_KINDS, TensorJob
from exporter.torchfile import TorchFile, load_torch_file, paused_collector
from exporter.torchfile.forked import ForkedLoads
from exporter.torchfile.peek import member_count
from exporter.torchfile.repeats import alike_files
from exporter.torchfile.runs import materialize

if TYPE_CHECKING:
    from exporter.neox.model import ModelPlan
    from exporter.neox.state import EngineState

__all__ = ["OPTIMIZER_KINDS", "OptimizerPlan", "forked_reading", "odd_files", "plan_optimizer"]

log = logging.getLogger(__name__)


@dataclass
class OptimizerPlan:
    """Optimizer tensors of one checkpoint, and the optimizer's non-tensor state.

    Attributes:
        jobs: one per (kind, parameter), Hugging Face names.
        format: ``deepspeed-zero`` or ``deeperspeed-elastic-stage1``.
        state_json: scalar state (loss scaler, partition counts, Adam hyper-parameters and
            step, how the step was derived), per file and summarised.
        units: the model-parallel units' parameters, by mp rank.
    """

    jobs: list[TensorJob]
    format: str
    state_json: dict[str, Any]
    units: dict[int, list[ParamSlices]] = field(default_factory=dict)
    dp_size: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    unit_tp_rank: dict[int, int] = field(default_factory=dict)

    def jobs_by_kind(self) -> dict[str, list[TensorJob]]:
        out: dict[str, list[TensorJob]] = {kind: [] for kind in OPTIMIZER_KINDS}
        for job in self.jobs:
            out[job.kind].append(job)
        return out


#: Storages across a step's partition files from which reading them on two processes pays:
#: a fork and its copy-on-write faults cost about what reading 8,000 tensor records here does
#: (0.08 s; an export of the Pythia layout, side by side with and without the fork).
FORK_FROM_STORAGES = 16_000


def shared_files(files: CheckpointFiles) -> list[Any]:
    """The partition files in the order :func:`plan_optimizer` reads them (unit by unit, each
    unit's in :func:`~exporter.neox.zero.order.reading_order`), for a forked reader to share
    with this process (:mod:`exporter.torchfile.forked`): none when their pickles are small
    (fewer than :data:`FORK_FROM_STORAGES` storages in all, counted from the zip files' end
    records)."""
    mps = sorted({mp for _, mp in files.optim_files})
    ranks = sorted({r for r, _ in files.optim_files})
    paths = []
    for mp in mps:
        unit = [files.optim_files[(r, mp)] for r in ranks if (r, mp) in files.optim_files]
        paths += [unit[i] for i in reading_order(unit)]
    counts = [member_count(Path(path)) for path in paths]
    if None not in counts and sum(c for c in counts if c is not None) < FORK_FROM_STORAGES:
        return []
    return paths


def forked_reading(files: CheckpointFiles) -> tuple[list[Any], list[int]] | None:
    """The partition files to share with a forked reader, and those it reads first
    (:func:`~exporter.neox.zero.order.child_share`); None where a child would not pay."""
    shared = shared_files(files)
    first = child_share(shared, files) if shared else None
    return None if first is None else (shared, first)


def load_partition_files(paths: list[Any], forked: ForkedLoads | None = None) -> list[TorchFile]:
    """Read the data-parallel partition files of one unit: here those this process claims
    from ``forked``, and the others as its child read them (meanwhile). Each file's share of
    the plan is derived as it comes (:func:`~exporter.neox.zero.elastic.prepare_file`), so
    that only the merge is left after the last."""
    loaded: dict[int, TorchFile] = {}
    with alike_files():  # ranks whose partitions have one size: one pickle
        for i in reading_order(paths) if forked is None else forked.order(paths):
            if forked is None or forked.claim(paths[i]):
                loaded[i] = _prepared(load_torch_file(paths[i], runs=True))
    for i, path in enumerate(paths):
        if i not in loaded:
            assert forked is not None
            loaded[i] = _prepared(forked.get(path, runs=True) or load_torch_file(path))
    return [loaded[i] for i in range(len(paths))]


def _prepared(tf: TorchFile) -> TorchFile:
    """``tf`` with its share of the plan derived (:func:`~exporter.neox.zero.elastic.
    prepare_file`), and its tree's lists of records made, but the runs that share was taken
    from (:mod:`exporter.torchfile.runs`: only the columns of those are wanted)."""
    prepare_file(tf)
    if tf.runs:
        tf.obj = materialize(tf.obj, keep=prepared_runs(tf))
    return tf


def detect_format(tf: TorchFile) -> str:
    osd = tf.obj.get("optimizer_state_dict") if isinstance(tf.obj, dict) else None
    if isinstance(osd, dict):
        if "single_partition_of_fp32_groups" in osd:
            return "deepspeed-zero"
        if "local_sub_partitions_of_fp32_groups" in osd:
            return "deeperspeed-elastic-stage1"
        keys = ", ".join(sorted(map(str, osd)))[:300]
    else:
        keys = ", ".join(sorted(map(str, tf.obj)))[:300] if isinstance(tf.obj, dict) else "none"
    raise LayoutError(f"{tf.path}: unknown optimizer layout (keys: {keys})")


def _param_shapes(value: Any, where: str) -> list[dict[str, tuple[int, ...]]]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(g, dict) for g in value):
        raise LayoutError(f"{where}: 'param_shapes' is missing or malformed")
    out = []
    for group in value:
        shapes = {}
        for name, shape in group.items():
            if not isinstance(name, str) or not isinstance(shape, tuple):
                raise LayoutError(f"{where}: malformed param_shapes entry {name!r}")
            shapes[name] = shape
        out.append(shapes)
    return out


def plan_optimizer(
    files: CheckpointFiles, model: ModelPlan, engine: EngineState, render_files: bool = True,
    forked: ForkedLoads | None = None,
) -> OptimizerPlan | None:
    """Plan every optimizer tensor of the checkpoint, or None if it has no ZeRO files.

    ``render_files``: keep every non-tensor value of each partition file in
    ``state_json["files"]`` (for ``state.json``); else only what the step check needs.
    ``forked``: partition files shared with a forked reader (:func:`shared_files`).

    Raises:
        LayoutError: missing/extra rank files, partition counts that disagree with the files,
            an unknown layout, or parameters that do not match the model.
    """
    if not files.optim_files:
        return None
    with paused_collector():
        return _plan_optimizer(files, model, engine, render_files, forked)


def _plan_optimizer(
    files: CheckpointFiles, model: ModelPlan, engine: EngineState, render_files: bool,
    forked: ForkedLoads | None,
) -> OptimizerPlan:
    mps = sorted({mp for _, mp in files.optim_files})
    dp = len({dp for dp, _ in files.optim_files})
    units: dict[int, list[ParamSlices]] = {}
    per_file: dict[str, Any] = {}
    summaries: dict[int, Any] = {}
    formats = set()
    loss_scale = None
    for mp in mps:
        tfs = load_partition_files([files.optim_files[(r, mp)] for r in range(dp)], forked)
        if mp == mps[0]:
            loss_scale = _loss_scale(tfs[0].obj)
        fmt = detect_format(tfs[0])
        formats.add(fmt)
        for tf in tfs[1:]:
            if detect_format(tf) != fmt:
                raise LayoutError(f"{tf.path}: partition files of mp_rank {mp:02d} mix formats")
        if fmt == "deepspeed-zero":
            root = engine.roots.get(mp)
            if not isinstance(root, dict) or "param_shapes" not in root:
                path = files.mp_files.get(mp)
                raise LayoutError(f"{path or files.folder}: no 'param_shapes' for mp_rank {mp:02d}")
            shapes = _param_shapes(root["param_shapes"], str(files.mp_files[mp]))
            units[mp], summaries[mp] = read_current(shapes, tfs)
        else:
            shapes = _param_shapes(tfs[0].obj.get("param_shapes"), str(tfs[0].path))
            units[mp], summaries[mp] = read_elastic(shapes, tfs, engine)
        for tf in tfs:
            per_file[tf.path.name] = render_partition_file(tf, render_files)
        _check_same_step([files.optim_files[(r, mp)] for r in range(dp)], per_file)
    disagree: list[str] = []
    jobs, unit_tp_rank, stages, missing = _merge_units(units, model, disagree)
    # The layouts' span tables, made here while the model's files are written, rather than
    # when the optimizer's files start and each file's thread waits on the GIL for its own.
    layouts = {id(s.layout): s.layout for params in units.values() for p in params
               for s in p.segments.values()}
    for layout in layouts.values():
        span_table(layout)
    if len(formats) != 1:
        raise LayoutError(f"{files.folder}: optimizer files mix formats {sorted(formats)}")
    fmt = formats.pop()
    summary = {
        **_summarise(summaries[mps[0]], engine, fmt),
        "loss_scale": loss_scale,
        "pp_size": stages,
        "parameters_without_state": missing,
    }
    state = {
        "format": fmt,
        "dp_size": dp,
        "summary": summary,
        "units": {f"mp_rank_{mp:02d}": s for mp, s in summaries.items()},
        "files": per_file,
        "tensor_parallel": _tp_note(model, disagree),
    }
    return OptimizerPlan(jobs, fmt, state, units, dp, summary, unit_tp_rank)


def _tp_note(model: ModelPlan, disagree: list[str]) -> dict[str, Any]:
    """How tensor-parallel copies were merged (``disagree`` fills while the moments stream)."""
    if model.tp_size == 1:
        return {"size": 1}
    gpt_j = model.spec is not None and model.spec.gpt_j_residual
    return {
        "size": model.tp_size,
        "row_parallel_bias_master": "sum of the ranks' copies, as the model weight (gpt-j-residual)"
        if gpt_j else "one rank's copy, checked equal on every rank",
        "row_parallel_bias_moments": (
            "one rank's exp_avg/exp_avg_sq (every rank's copy gets the same gradient). The "
            f"summed bias is the sum of {model.tp_size} copies each updated with these moments, so one Adam "
            f"step moves it {model.tp_size} times the update these moments give one copy"
            if gpt_j else "one rank's exp_avg/exp_avg_sq (every rank's copy gets the same gradient)"),
        "replicas_that_disagree": disagree,
    }


def _summarise(unit: dict[str, Any], engine: EngineState, fmt: str) -> dict[str, Any]:
    groups = unit.get("groups") or [{}]
    first = groups[0]
    lr = first.get("hyperparameters", {}).get("lr")
    step = first.get("adam_step")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        lr, lr_source = float(lr), "optimizer state (param_groups lr)"
    else:
        # Pythia-era files keep no lr; GPT-NeoX's scheduler state gives it (neox/schedule.py),
        # by the formula of the checkpoint's era.
        formula = "2022" if fmt == "deeperspeed-elastic-stage1" else "2023"
        lr, lr_source = derived_learning_rate(engine.value("lr_scheduler"), formula)
    return {
        "learning_rate": lr,
        "learning_rate_source": lr_source,
        "adam_step": int(step) if isinstance(step, (int, float)) else None,
        "adam_step_source": unit.get("adam_step_source", "optimizer state"),
    }


def _loss_scale(root: Any) -> float | None:
    osd = root.get("optimizer_state_dict") if isinstance(root, dict) else None
    scaler = osd.get("loss_scaler") if isinstance(osd, dict) else None
    state = getattr(scaler, "state", None) if scaler is not None else None
    if isinstance(state, dict) and isinstance(state.get("cur_scale"), (int, float)):
        return float(state["cur_scale"])
    return None


def _check_same_step(paths: list[Any], rendered: dict[str, Any]) -> None:
    """Refuse partition files that disagree on state all ranks share (mixed-up steps)."""
    first = None
    for path in paths:
        osd = rendered[path.name].get("optimizer_state_dict", {}) if isinstance(rendered[path.name], dict) else {}
        shared = {k: osd.get(k) for k in SHARED_STATE} if isinstance(osd, dict) else {}
        if first is None:
            first = (path, shared)
        elif shared != first[1]:
            differ = sorted(k for k in shared if shared[k] != first[1].get(k))
            raise LayoutError(
                f"{path}: partition file disagrees with {first[0].name} on {', '.join(differ)} "
                f"(files from different steps or runs?)"
            )


def _merge_units(
    units: dict[int, list[ParamSlices]], model: ModelPlan, disagree: list[str]
) -> tuple[list[TensorJob], dict[int, int], int, list[str]]:
    # Units holding the same names are tensor-parallel ranks of one pipeline stage (mp order).
    stages: dict[tuple[str, ...], list[list[ParamSlices]]] = {}
    unit_tp_rank: dict[int, int] = {}
    for mp in sorted(units):
        key = tuple(sorted(p.name for p in units[mp]))
        unit_tp_rank[mp] = len(stages.get(key, []))
        stages.setdefault(key, []).append(units[mp])
    model_names = {j.neox_name: j for j in model.jobs if j.neox_name and j.kind != "state"}
    jobs: list[TensorJob] = []
    seen: set[str] = set()
    for ranks in stages.values():
        if len(ranks) != model.tp_size:
            raise LayoutError(
                f"optimizer files hold {len(ranks)} tensor-parallel rank(s) of some parameters, "
                f"the model has {model.tp_size}"
            )
        by_name = [{p.name: p for p in rank} for rank in ranks]
        for param in ranks[0]:
            layer, key = split_module_name(param.name)
            neox_name = f"{layer}.{key}"
            if neox_name not in model_names:
                raise LayoutError(f"optimizer parameter {param.name!r} has no model weight")
            if neox_name in seen:
                raise LayoutError(f"optimizer parameter {param.name!r} appears in two units")
            seen.add(neox_name)
            shards = [b[param.name] for b in by_name]
            # Each rank's state has its weight shard's shape, so the model's merge and split
            # rules (row ranges included) apply to it unchanged.
            weights = [tuple(rank[key].shape) for rank in model.shards[layer]]
            if [tuple(s.shape) for s in shards] != weights:
                raise LayoutError(
                    f"optimizer parameter {param.name!r} has shard shapes "
                    f"{[list(s.shape) for s in shards]}, the model weight {[list(w) for w in weights]}"
                )
            for rule in model.outputs[neox_name]:
                shape = rule.shape
                for kind in OPTIMIZER_KINDS:
                    jobs.append(
                        TensorJob(
                            name=rule.hf_name,
                            kind=kind,
                            dtype=shards[0].segments[kind].first.dtype if shards[0].segments[kind] else float32,
                            shape=shape,
                            chunks=_chunks(shards, kind, rule, disagree),
                            neox_name=neox_name,
                            layer=rule.block,
                        )
                    )
    missing = sorted(n for n, j in model_names.items() if j.kind == "model" and n not in seen)
    if missing:
        # Frozen parameters have no optimizer state (DeepSpeed saves them as
        # frozen_param_shapes); the plan records them and verify reports them.
        log.warning("optimizer files have no state for %d parameter(s): %s", len(missing), missing[:5])
    order = {j.name: i for i, j in enumerate(model.jobs)}
    jobs.sort(key=lambda j: (OPTIMIZER_KINDS.index(j.kind), order[j.name]))
    return jobs, unit_tp_rank, len(stages), missing


def _chunks(shards: list[ParamSlices], kind: str, rule: OutputRule,
            disagree: list[str]) -> Callable[[int], Iterator[np.ndarray]]:
    def shard(param: ParamSlices) -> Shard:
        def read_range(start: int, count: int) -> np.ndarray:
            return param.read_range(kind, start, count)

        segments = param.segments[kind]
        dtype = segments.first.dtype if segments else float32
        return Shard(param.shape, dtype.itemsize, param.chunks(kind), read_range, dtype)

    if kind != "master" and rule.table_merge is Merge.ROW_BIAS:
        # Every rank's copy of a row-parallel bias receives the same gradient (the bias is
        # added after the all-reduce, or inside the one gpt-j-residual all-reduce whose
        # gradient every rank gets whole), so Adam's moments agree on all ranks: one copy is
        # the moment, never their sum. A difference is recorded, not hidden.
        def mismatch() -> None:
            label = f"{kind} {rule.hf_name}"
            if label not in disagree:
                disagree.append(label)
                log.warning("tensor-parallel ranks disagree on %s; rank 0's copy kept", label)

        return rule.chunks([shard(s) for s in shards], mismatch, Merge.REPLICATED)
    return rule.chunks([shard(s) for s in shards])
