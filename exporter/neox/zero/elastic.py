"""ZeRO stage-1 elastic checkpoints of EleutherAI's DeeperSpeed (the Pythia era).

Source: EleutherAI/DeeperSpeed eb7f5cff ``deepspeed/runtime/zero/stage1.py``
(``FP16_DeepSpeedZeroOptimizer_Stage1``): each param group is flattened in group order,
zero-padded at the end and cut into ``dp * num_comm_intervals`` equal sub-partitions;
sub-partition ``k`` belongs to rank ``k % dp`` and comm interval ``k // dp``
(``get_data_parallel_sub_partitions``). ``_elastic_state_dict`` saves, per rank,
``local_sub_partitions_of_fp32_groups[g][comm]`` and ``base_optimizer_state[g][comm]``
(``exp_avg``, ``exp_avg_sq``) with the padding trimmed (``_get_groups_without_padding``,
``_get_state_without_padding``). Concatenating the saved sub-partitions in ``k`` order
therefore gives back the unpadded flat group, and a parameter is a slice of it.

``param_shapes`` (``engine._get_zero_param_shapes`` of that version) is one OrderedDict of
every module parameter in ``named_parameters()`` order. The groups are GPT-NeoX's
``get_params_for_weight_decay_optimization`` (``megatron/model/utils.py``): group 0 holds the
weights of non-norm modules, group 1 the norm parameters and every bias; both keep
``named_parameters()`` order because both walk ``module.modules()``.

Adam's step count is not saved (FusedAdam keeps it in the param group, which the elastic
state omits); it is derived from the engine state as ``1 + global_steps - skipped_steps``:
stage 1's ``_initialize_optimizer_states`` takes one step at set-up, and every step that did
not overflow takes one more.
"""

from __future__ import annotations

import itertools
import math
from operator import attrgetter, itemgetter
from typing import Any

from exporter.errors import LayoutError
from exporter.neox.zero.common import (
    FlatLayout,
    ParamSlices,
    flat_partition,
    partition_state_dicts,
)
from exporter.neox.zero.gather import span_table
from exporter.torchfile import TensorRef, TorchFile

_NUMEL = attrgetter("numel")  # C-level maps: a many-interval group has 100,000 sub-partitions

ADAM_STEP_SOURCE = "derived: 1 + global_steps - skipped_steps (stage 1 elastic files omit it)"


def is_no_decay(name: str) -> bool:
    """Whether GPT-NeoX puts parameter ``name`` in the no-weight-decay group (norms, biases)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    return parts[-1] == "bias" or module.endswith("norm") or module.endswith("layernorm")


def split_groups(
    shapes: list[dict[str, tuple[int, ...]]], groups: int
) -> list[dict[str, tuple[int, ...]]]:
    """Per-group shapes: as given, or one ordered dict split by GPT-NeoX's weight-decay rule."""
    if len(shapes) == groups:
        return shapes
    if len(shapes) == 1 and groups == 2:
        decay = {n: s for n, s in shapes[0].items() if not is_no_decay(n)}
        no_decay = {n: s for n, s in shapes[0].items() if is_no_decay(n)}
        return [decay, no_decay]
    raise LayoutError(
        f"param_shapes has {len(shapes)} group(s) but the optimizer state has {groups}"
    )


def _group_list(osd: dict[str, Any], key: str, where: str) -> list[list[Any]]:
    value = osd.get(key)
    if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
        raise LayoutError(f"{where}: '{key}' is not a list of groups of comm intervals")
    return value


def read_elastic(
    param_shapes: list[dict[str, tuple[int, ...]]], files: list[TorchFile], engine: Any
) -> tuple[list[ParamSlices], dict[str, Any]]:
    """Parameters of one model-parallel unit from its elastic stage-1 partition files."""
    dp = len(files)
    osds = partition_state_dicts(files)
    fp32 = [_group_list(o, "local_sub_partitions_of_fp32_groups", str(tf.path))
            for o, tf in zip(osds, files, strict=True)]
    states = [_group_list(o, "base_optimizer_state", str(tf.path))
              for o, tf in zip(osds, files, strict=True)]
    groups = len(fp32[0])
    shapes = split_groups(param_shapes, groups)
    intervals = osds[0].get("num_comm_intervals_per_group")
    params: list[ParamSlices] = []
    summary: dict[str, Any] = {"groups": [], "adam_step_source": ADAM_STEP_SOURCE}
    for g in range(groups):
        comms = len(fp32[0][g])
        if isinstance(intervals, list) and len(intervals) > g and intervals[g] != comms:
            raise LayoutError(
                f"{files[0].path}: group {g} has {comms} comm intervals, "
                f"num_comm_intervals_per_group says {intervals[g]}"
            )
        for rank in range(dp):
            if len(fp32[rank][g]) != comms or len(states[rank][g]) != comms:
                raise LayoutError(f"{files[rank].path}: group {g} has a different number of comm intervals")
        turns = _sub_partitions(files, fp32, states, g, comms)
        pieces = {kind: _in_turns(lists) for kind, lists in turns.items()}
        lengths = list(map(_NUMEL, pieces["master"]))
        for kind in ("exp_avg", "exp_avg_sq"):
            if list(map(_NUMEL, pieces[kind])) != lengths:
                raise LayoutError(f"{files[0].path}: group {g} {kind} slices differ from the master's")
        total = sum(lengths)
        needed = sum(math.prod(s) for s in shapes[g].values())
        if total != needed:
            raise LayoutError(
                f"{files[0].path}: group {g} sub-partitions hold {total} elements, its "
                f"parameters need {needed} (wrong or mixed partition files?)"
            )
        _check_padding(osds, files, g, comms, lengths)
        offset = 0
        layouts = {kind: FlatLayout.whole(refs) for kind, refs in pieces.items()}
        for kind, layout in layouts.items():
            span_table(layout, turns[kind])  # rank by rank, while the records are at hand
        for name, shape in shapes[g].items():
            param = ParamSlices(name, tuple(shape), g)
            n = param.numel()
            for kind, layout in layouts.items():
                param.segments[kind] = layout.covering(offset, n, f"{files[0].path}: {name}")
            params.append(param)
            offset += n
        summary["groups"].append(
            {"adam_step": _derived_step(engine), "hyperparameters": {}, "comm_intervals": comms,
             "sub_partitions": comms * dp, "elements": total, "parameters": len(shapes[g])}
        )
    return params, summary


def _sub_partitions(files: list[TorchFile], fp32: list[list[list[Any]]],
                    states: list[list[list[Any]]], g: int, comms: int
                    ) -> dict[str, list[list[TensorRef]]]:
    """Group ``g``'s sub-partitions of each kind, rank by rank (sub-partition k of the flat
    group is rank k % dp's comm interval k // dp: :func:`_in_turns`).

    Thousands per group with a small bucket: taken and checked list by list (C-level maps
    over shared shape tuples); the checks are made one by one only to name what fails.
    """
    dp = len(files)
    masters = [fp32[r][g] for r in range(dp)]
    try:
        avgs = [list(map(itemgetter("exp_avg"), states[r][g])) for r in range(dp)]
        avg_sqs = [list(map(itemgetter("exp_avg_sq"), states[r][g])) for r in range(dp)]
    except (TypeError, KeyError, IndexError):
        avgs = avg_sqs = []
    lists = [*masters, *avgs, *avg_sqs]
    if len(lists) == 3 * dp and all(len(refs) == comms and _all_flat(refs) for refs in lists):
        return {"master": masters, "exp_avg": avgs, "exp_avg_sq": avg_sqs}
    for comm in range(comms):
        for rank in range(dp):
            state = states[rank][g][comm]
            master = fp32[rank][g][comm]
            try:
                avg, avg_sq = state["exp_avg"], state["exp_avg_sq"]
            except (TypeError, KeyError, IndexError):
                avg = avg_sq = None
            if not (_is_flat(master) and _is_flat(avg) and _is_flat(avg_sq)):
                _refuse_partition(files[rank], g, comm, (master, avg, avg_sq), state)
    raise AssertionError("a sub-partition failed the list check but not its own")


def _in_turns(lists: list[list[Any]]) -> list[Any]:
    """The first of each list, then the second of each, ...: the group's k order."""
    return list(itertools.chain.from_iterable(zip(*lists, strict=True)))


def _all_flat(refs: list[Any]) -> bool:
    """Every one of ``refs`` passes :func:`_is_flat` (decided on the few distinct shapes)."""
    if set(map(type, refs)) - {TensorRef}:
        return False
    strides = set(map(attrgetter("stride"), refs))
    if strides == {(1,)}:  # the common case: one shared tuple, no pair made per tensor
        return all(len(shape) == 1 for shape in set(map(attrgetter("shape"), refs)))
    shapes = set(map(attrgetter("shape", "stride"), refs))
    return all(len(shape) == 1 and (stride[0] == 1 or shape[0] <= 1) for shape, stride in shapes)


def _is_flat(ref: Any) -> bool:
    return type(ref) is TensorRef and len(ref.shape) == 1 and (ref.stride[0] == 1 or ref.shape[0] <= 1)


def _refuse_partition(tf: TorchFile, g: int, comm: int, refs: tuple[Any, ...], state: Any) -> None:
    where = f"{tf.path} group {g} comm interval {comm}"
    flat_partition(refs[0], where)
    if not isinstance(state, dict):
        raise LayoutError(f"{where}: optimizer state is not a dict")
    for kind, ref in zip(("exp_avg", "exp_avg_sq"), refs[1:], strict=True):
        if kind not in state:
            raise LayoutError(f"{where}: optimizer state has no {kind!r} (not Adam?)")
        flat_partition(ref, f"{where} {kind}")
    raise LayoutError(f"{where}: not a flat partition tensor")


def _check_padding(osds: list[dict[str, Any]], files: list[TorchFile], g: int, comms: int,
                   lengths: list[int]) -> None:
    """Every saved sub-partition plus its recorded padding has one common size (stage 1 cuts
    equal sub-partitions), when ``group_paddings`` was saved."""
    dp = len(files)
    sizes = set()
    for k, lean in enumerate(lengths):
        paddings = osds[k % dp].get("group_paddings")
        if not (isinstance(paddings, list) and len(paddings) > g and isinstance(paddings[g], list)):
            return
        local = paddings[g]
        index = k // dp if len(local) == comms else k
        if index >= len(local):
            return
        sizes.add(lean + int(local[index]))
    if len(sizes) > 1:
        raise LayoutError(f"{files[0].path}: group {g} sub-partitions and paddings do not add up")


def _derived_step(engine: Any) -> int | None:
    steps = engine.value("global_steps") if engine is not None else None
    skipped = engine.value("skipped_steps", 0) if engine is not None else None
    if isinstance(steps, int) and isinstance(skipped, int):
        return 1 + steps - skipped
    return None
