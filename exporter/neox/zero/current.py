"""ZeRO stage 1/2 partitions as current DeepSpeed (0.10+) writes them.

Source: DeepSpeed ``runtime/zero/stage_1_and_2.py`` ``DeepSpeedZeroOptimizer.state_dict`` and
``runtime/bf16_optimizer.py`` ``BF16_Optimizer.state_dict``; key names in
``checkpoint/constants.py``. Per param group g, rank r's file holds
``single_partition_of_fp32_groups[g]`` (the rank's fp32 slice; stage_1_and_2 strips the
group's alignment padding from the last rank, ``_get_groups_without_padding``),
``base_optimizer_state`` (a torch optimizer ``state_dict``: ``state[g]`` with ``exp_avg``,
``exp_avg_sq`` over the *padded* slice and ``step``), ``group_paddings``,
``partition_count`` and, since 0.16, ``param_alignment_paddings`` (zero elements inserted
after each parameter of the flat buffer). The flat buffer follows ``param_shapes`` (engine
``_get_zero_param_shapes``, which reads ``round_robin_bit16_groups``); the saved
``param_slice_mappings`` follow ``bit16_groups`` and disagree with the layout under ZeRO-2
``round_robin_gradients``, so they are not used.
"""

from __future__ import annotations

from typing import Any

from exporter.errors import LayoutError
from exporter.neox.zero.common import (
    FlatLayout,
    ParamSlices,
    flat_partition,
    partition_state_dicts,
    scalar,
)
from exporter.neox.zero.elastic import split_groups
from exporter.torchfile import TorchFile


def _per_group(value: Any, groups: int, what: str, where: str) -> list[Any]:
    if isinstance(value, (list, tuple)) and len(value) == groups:
        return list(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * groups
    raise LayoutError(f"{where}: '{what}' should have one entry per param group ({groups})")


def read_current(
    param_shapes: list[dict[str, tuple[int, ...]]], files: list[TorchFile]
) -> tuple[list[ParamSlices], dict[str, Any]]:
    """Parameters of one model-parallel unit from its data-parallel partition files.

    Args:
        param_shapes: per group, module name -> shape, in flat-buffer order.
        files: the unit's ``zero_pp_rank_{r}_...`` files, by rank.

    Returns:
        The parameters with their master / exp_avg / exp_avg_sq slices, and a summary
        (Adam step per group, hyper-parameters, partition geometry).
    """
    dp = len(files)
    states = partition_state_dicts(files)
    saved = states[0].get("single_partition_of_fp32_groups")
    groups = len(saved) if isinstance(saved, list) else len(param_shapes)
    # Older engines saved one param_shapes dict for all groups: split it as GPT-NeoX groups.
    param_shapes = split_groups(param_shapes, groups)

    params: list[ParamSlices] = []
    summary: dict[str, Any] = {"groups": []}
    for g, shapes in enumerate(param_shapes):
        masters, moments = [], {"exp_avg": [], "exp_avg_sq": []}
        steps, hyper = [], {}
        for tf, osd in zip(files, states, strict=True):
            where = f"{tf.path} group {g}"
            parts = osd.get("single_partition_of_fp32_groups")
            if not isinstance(parts, list) or len(parts) != groups:
                raise LayoutError(f"{tf.path}: single_partition_of_fp32_groups has no group {g}")
            masters.append(flat_partition(parts[g], where))
            base = osd.get("base_optimizer_state")
            state, hyper = _group_state(base, g, where)
            for kind in moments:
                if kind not in state:
                    raise LayoutError(f"{where}: optimizer state has no {kind!r} (not Adam?)")
                moments[kind].append(flat_partition(state[kind], f"{where} {kind}"))
            steps.append(scalar(state.get("step", osd.get("base_optimizer_state_step"))))
        paddings = [
            _per_group(osd.get("group_paddings", 0), groups, "group_paddings", str(tf.path))[g]
            for tf, osd in zip(files, states, strict=True)
        ]
        padded = moments["exp_avg"][0].numel
        if dp > 1 and masters[0].numel != padded:
            raise LayoutError(f"{files[0].path}: group {g} master and moments differ in size")
        for r, (ref, pad) in enumerate(zip(masters, paddings, strict=True)):
            expected = padded - pad
            # stage_1_and_2 trims the padding from the saved slice, BF16_Optimizer does not.
            if ref.numel not in (expected, padded):
                raise LayoutError(
                    f"{files[r].path}: group {g} partition holds {ref.numel} elements, expected "
                    f"{expected} ({padded} minus padding {pad})"
                )
            for kind in moments:
                if moments[kind][r].numel != padded:
                    raise LayoutError(
                        f"{files[r].path}: group {g} {kind} holds {moments[kind][r].numel} "
                        f"elements, rank 0 holds {padded}"
                    )
        align = states[0].get("param_alignment_paddings")
        param_pads = list(align[g]) if isinstance(align, list) and len(align) > g else []
        layouts = {kind: FlatLayout([(ref, 0, padded) for ref in refs])
                   for kind, refs in {"master": masters, **moments}.items()}
        offset = 0
        for k, (name, shape) in enumerate(shapes.items()):
            param = ParamSlices(name, tuple(shape), g)
            n = param.numel()
            for kind, layout in layouts.items():
                param.segments[kind] = layout.covering(offset, n, f"{files[0].path}: {name}")
            params.append(param)
            offset += n + (param_pads[k] if k < len(param_pads) else 0)
        total = padded * dp
        if offset + paddings[-1] != total:
            raise LayoutError(
                f"{files[-1].path}: group {g} partitions hold {total} elements but its "
                f"parameters ({offset}) plus padding ({paddings[-1]}) make {offset + paddings[-1]}"
            )
        summary["groups"].append(
            {"adam_step": steps[0], "hyperparameters": hyper, "partition_size": padded,
             "padding": paddings[-1], "parameters": len(shapes)}
        )
    return params, summary


def _group_state(base: Any, g: int, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state of group g's flat parameter, group hyper-parameters) from either
    ``base_optimizer_state`` form: a torch ``state_dict`` or the elastic per-group list."""
    if isinstance(base, dict) and "state" in base:
        state = base["state"].get(g) if isinstance(base["state"], dict) else None
        groups = base.get("param_groups") or []
        hyper = {k: v for k, v in groups[g].items() if k != "params"} if len(groups) > g else {}
    elif isinstance(base, list) and len(base) > g:
        state, hyper = base[g], {}
    else:
        state, hyper = None, {}
    if not isinstance(state, dict):
        raise LayoutError(f"{where}: base_optimizer_state has no state for this group")
    return state, hyper
