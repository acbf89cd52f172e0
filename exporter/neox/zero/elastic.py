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

import math
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np

from exporter.errors import LayoutError
from exporter.neox.zero.common import (
    FlatLayout,
    ParamSlices,
    flat_partition,
    partition_state_dicts,
)
from exporter.neox.zero.gather import columns_of, span_table
from exporter.torchfile import TensorRef, TorchFile
from exporter.torchfile.runs import RecordRun

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
    if not isinstance(value, list) or not all(isinstance(g, (list, RecordRun)) for g in value):
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
        turns, made = _sub_partitions(files, fp32, states, g, comms)
        sizes = {kind: _sizes_in_turns(turns[kind], made[kind]) for kind in turns}
        lengths = sizes["master"]
        for kind in ("exp_avg", "exp_avg_sq"):
            if not np.array_equal(sizes[kind], lengths):
                raise LayoutError(f"{files[0].path}: group {g} {kind} slices differ from the master's")
        total = int(lengths.sum())
        needed = sum(math.prod(s) for s in shapes[g].values())
        if total != needed:
            raise LayoutError(
                f"{files[0].path}: group {g} sub-partitions hold {total} elements, its "
                f"parameters need {needed} (wrong or mixed partition files?)"
            )
        _check_padding(osds, files, g, comms, lengths)
        offset = 0
        layouts = {kind: FlatLayout.in_turns(turns[kind], sizes[kind]) for kind in turns}
        for kind, layout in layouts.items():
            span_table(layout, turns[kind], made[kind])  # rank by rank, while the records are at hand
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


def prepare_file(tf: TorchFile) -> None:
    """Derive ahead what :func:`read_elastic` takes of one partition file alone: each group's
    sub-partitions of each kind, checked flat, and their :func:`~exporter.neox.zero.gather.
    columns_of`, kept in ``tf.derived``. Made as each file is read, while this process would
    otherwise wait for the forked reader's last file: the plan merged after it took 0.41 s
    on the many-interval twin, 0.25 s of it these columns. A file loaded with ``runs`` (its
    lists of records left as :class:`~exporter.torchfile.runs.RecordRun`) gives them from its
    rows. Nothing is kept for a file of another layout, or one whose tree does not hold flat
    lists of tensors there (:func:`read_elastic` then names the fault)."""
    osd = tf.obj.get("optimizer_state_dict") if isinstance(tf.obj, dict) else None
    fp32 = osd.get("local_sub_partitions_of_fp32_groups") if isinstance(osd, dict) else None
    states = osd.get("base_optimizer_state") if isinstance(osd, dict) else None
    if not (isinstance(fp32, list) and isinstance(states, list) and len(fp32) == len(states)):
        return
    groups = []
    for masters, group_states in zip(fp32, states, strict=True):
        kinds = _kind_lists(masters, group_states)
        if kinds is None:
            return
        group = {}
        for kind, refs in kinds.items():
            columns = (refs.columns() if type(refs) is RecordRun
                       else columns_of(refs) if _all_flat(refs) else None)
            if columns is None:
                return
            group[kind] = (refs, columns)
        groups.append(group)
    tf.derived["elastic"] = (fp32, states, groups)


def prepared_runs(tf: TorchFile) -> set[int]:
    """The ids of the :class:`~exporter.torchfile.runs.RecordRun` s :func:`prepare_file` took
    the columns of (read from those, never made into lists)."""
    found = tf.derived.get("elastic")
    if found is None:
        return set()
    fp32, states, _ = found
    return {id(run) for run in (*fp32, *states) if type(run) is RecordRun}


def _kind_lists(masters: Any, states: Any) -> dict[str, Any] | None:
    """One rank's sub-partitions of one group, by kind, when they are lists of one length
    (or runs of records, :class:`~exporter.torchfile.runs.RecordRun`)."""
    if type(masters) is RecordRun and type(states) is RecordRun and not masters.keys:
        runs = {"master": masters, "exp_avg": states.under("exp_avg"),
                "exp_avg_sq": states.under("exp_avg_sq")}
        if any(run is None or len(run) != len(masters) for run in runs.values()):
            return None
        return runs
    if not (isinstance(masters, list) and isinstance(states, list)):
        return None
    try:
        kinds = {"master": masters, "exp_avg": list(map(itemgetter("exp_avg"), states)),
                 "exp_avg_sq": list(map(itemgetter("exp_avg_sq"), states))}
    except (TypeError, KeyError, IndexError):
        return None
    return kinds if len({len(refs) for refs in kinds.values()}) == 1 else None


def _prepared(tf: TorchFile, fp32: Any, states: Any, g: int) -> dict[str, tuple[Any, Any]] | None:
    """What :func:`prepare_file` derived of group ``g`` of ``tf``, if it was derived from these
    very lists (the tree ``read_elastic`` reads)."""
    found = tf.derived.get("elastic")
    if found is None or found[0] is not fp32 or found[1] is not states or g >= len(found[2]):
        return None
    return found[2][g]


def _sub_partitions(files: list[TorchFile], fp32: list[list[list[Any]]],
                    states: list[list[list[Any]]], g: int, comms: int
                    ) -> tuple[dict[str, list[list[TensorRef]]], dict[str, list[Any]]]:
    """Group ``g``'s sub-partitions of each kind, rank by rank (sub-partition k of the flat
    group is rank k % dp's comm interval k // dp: :func:`_sizes_in_turns`), and the columns of each
    rank's list where :func:`prepare_file` made them (else None).

    Thousands per group with a small bucket: taken and checked list by list (C-level maps
    over shared shape tuples); the checks are made one by one only to name what fails.
    """
    dp = len(files)
    turns: dict[str, list[Any]] = {"master": [], "exp_avg": [], "exp_avg_sq": []}
    made: dict[str, list[Any]] = {kind: [] for kind in turns}
    flat: set[int] = set()  # the lists prepare_file checked
    for r in range(dp):
        ready = _prepared(files[r], fp32[r], states[r], g)
        kinds = ({kind: refs for kind, (refs, _) in ready.items()} if ready is not None
                 else _kind_lists(fp32[r][g], states[r][g]))
        if kinds is None:
            break
        for kind, refs in kinds.items():
            turns[kind].append(refs)
            made[kind].append(ready[kind][1] if ready is not None else None)
            if ready is not None:
                flat.add(id(refs))
    lists = [refs for kind in turns.values() for refs in kind]
    if len(lists) == 3 * dp and all(len(refs) == comms and (id(refs) in flat or _all_flat(refs))
                                    for refs in lists):
        return turns, made
    for comm in range(comms):
        for rank in range(dp):
            state = states[rank][g][comm]
            master = fp32[rank][g][comm]
            # Each moment on its own: a state without exp_avg_sq is named for that.
            avg, avg_sq = (state.get("exp_avg"), state.get("exp_avg_sq")) if isinstance(
                state, dict) else (None, None)
            if not (_is_flat(master) and _is_flat(avg) and _is_flat(avg_sq)):
                _refuse_partition(files[rank], g, comm, (master, avg, avg_sq), state)
    raise AssertionError("a sub-partition failed the list check but not its own")


def _sizes_in_turns(lists: list[Any], made: list[Any]) -> np.ndarray:
    """The element counts of the records of ``lists`` (of one length), the first of each list,
    then the second of each, ...: the group's k order. From the columns made ahead
    (:func:`prepare_file`) where there are."""
    parts = [np.fromiter(map(_NUMEL, refs), np.int64, len(refs)) if ready is None else ready[6]
             for refs, ready in zip(lists, made, strict=True)]
    return np.stack(parts, axis=1).ravel()


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
                   lengths: np.ndarray) -> None:
    """Every saved sub-partition plus its recorded padding has one common size (stage 1 cuts
    equal sub-partitions), when every rank saved ``group_paddings`` for its own sub-partitions
    (one per comm interval) or for all of them (``lengths``: in k order)."""
    dp = len(files)
    sizes = []
    for rank, osd in enumerate(osds):
        paddings = osd.get("group_paddings")
        if not (isinstance(paddings, list) and len(paddings) > g and isinstance(paddings[g], list)):
            return
        local = paddings[g]
        # Sub-partition k = rank + dp * comm: its padding is local[comm], or local[k].
        index = np.arange(comms) if len(local) == comms else np.arange(rank, len(lengths), dp)
        if len(index) and index[-1] >= len(local):
            return
        try:
            padding = np.array(local, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise LayoutError(f"{files[rank].path}: group {g} paddings are not whole numbers") from None
        sizes.append(lengths[rank::dp] + padding[index])
    if sizes and len(np.unique(np.concatenate(sizes))) > 1:
        raise LayoutError(f"{files[0].path}: group {g} sub-partitions and paddings do not add up")


def _derived_step(engine: Any) -> int | None:
    steps = engine.value("global_steps") if engine is not None else None
    skipped = engine.value("skipped_steps", 0) if engine is not None else None
    if isinstance(steps, int) and isinstance(skipped, int):
        return 1 + steps - skipped
    return None
