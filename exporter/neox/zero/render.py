"""The non-tensor state of partition files, as ``state.json`` shows it.

Every value of a partition file is kept (``optimizer.files`` in ``state.json``), its tensors
described as ``{"__partition__": dtype, "numel": n}``. A file of DeeperSpeed with a small
``reduce_bucket_size`` holds one sub-partition per comm interval (tens of thousands, nearly all
alike), so a long list whose consecutive items repeat is written as its runs:
``{"__runs__": [[count, item], ...]}``, which keeps every value and its order. Measured on
eight files of 12,000 comm intervals each: 38 MB of ``state.json`` before, and most of a
many-interval export's time after the tensors went into writing it.

Such a list of tensor records, or of dicts of them, is grouped into its runs before it is
rendered (:func:`_grouped`): its records compared by what their rendering shows (dtype and
size), in C-level maps, and only each run's first rendered. The output is what rendering
every record and then grouping gives (0.06-0.16 s for a file of 36,369 records before).
"""

from __future__ import annotations

import itertools
from operator import attrgetter
from typing import Any

import numpy as np

from exporter.torchfile import TensorRef, TorchFile, to_json
from exporter.torchfile.runs import RecordRun
from exporter.torchfile.tree import MAX_DEPTH

#: Lists shorter than this are written item by item.
RUNS_FROM = 8

# Values every partition file of one checkpoint shares: the loss scaler is updated in lockstep
# on all ranks (its overflow check is all-reduced), and so is the optimizer's step count.
SHARED_STATE = ("loss_scaler", "overflow", "base_optimizer_state_step", "zero_stage")


def render_partition_file(tf: TorchFile, everything: bool = True) -> Any:
    """``tf``'s values as JSON: all of them, or (``everything=False``) only the
    :data:`SHARED_STATE` its step is checked with."""
    # One shared dict per (dtype, numel): thousands of partitions have a few sizes.
    seen: dict[tuple[Any, int], dict[str, Any]] = {}

    def tensor(ref: Any) -> Any:
        key = (ref.dtype, ref.numel)
        if key not in seen:
            seen[key] = {"__partition__": str(ref.dtype).removeprefix("torch."), "numel": ref.numel}
        return seen[key]

    if everything:
        return as_runs(to_json(_grouped(tf.obj, {}, set(), 0), tensor=tensor))
    osd = tf.obj.get("optimizer_state_dict") if isinstance(tf.obj, dict) else None
    if not isinstance(osd, dict):
        return {}
    return {"optimizer_state_dict": {key: to_json(osd[key], tensor=tensor)
                                     for key in SHARED_STATE if key in osd}}


def as_runs(value: Any) -> Any:
    """``value`` (rendered JSON) with each long list of repeating items written as runs."""
    if isinstance(value, dict):
        return {key: as_runs(item) for key, item in value.items()}
    if not isinstance(value, list):
        return value
    items = [as_runs(item) for item in value]
    if len(items) < RUNS_FROM:
        return items
    runs: list[list[Any]] = []
    for item in items:
        if runs and runs[-1][1] == item:
            runs[-1][0] += 1
        else:
            runs.append([1, item])
    return {"__runs__": runs} if len(runs) * 4 <= len(items) else items


def _grouped(value: Any, seen: dict[int, Any], active: set[int], depth: int) -> Any:
    """``value`` with each list that :func:`as_runs` would write as runs, and whose items are
    all tensor records or all dicts of them, written as ``{"__runs__": [[count, item], ...]}``
    of its source items; dicts and lists copied where they hold one. Each container is taken
    once (a shared one stays shared); a cycle, or nesting past ``to_json``'s limit, is left as
    it is, for ``to_json`` to refuse."""
    kind = type(value)
    if kind is RecordRun:  # records left in their rows (exporter.torchfile.runs)
        if id(value) not in seen:
            seen[id(value)] = _record_runs(value)
        return seen[id(value)]
    if (kind is not dict and kind is not list) or depth > MAX_DEPTH or id(value) in active:
        return value
    if id(value) in seen:
        return seen[id(value)]
    active.add(id(value))
    try:
        if kind is dict:
            out: Any = {key: _grouped(item, seen, active, depth + 1) for key, item in value.items()}
        else:
            out = _runs(value)
            if out is None:
                out = [_grouped(item, seen, active, depth + 1) for item in value]
    finally:
        active.discard(id(value))
    seen[id(value)] = out
    return out


_DTYPE, _NUMEL = attrgetter("dtype"), attrgetter("numel")


def _record_runs(run: RecordRun) -> Any:
    """What :func:`_runs` gives of the run's records, found from its rows (each item's dtype
    and sizes, :meth:`~exporter.torchfile.runs.RecordRun.marks`): only each run's first item
    made."""
    marks = run.marks()
    firsts = [0, *(np.flatnonzero((marks[1:] != marks[:-1]).any(axis=1)) + 1).tolist()]
    if len(run) < RUNS_FROM or len(firsts) * 4 > len(run):
        return run.records()
    counts = np.diff([*firsts, len(run)]).tolist()
    return {"__runs__": [[count, run[at]] for count, at in zip(counts, firsts, strict=True)]}


def _runs(items: list[Any]) -> Any:
    """``items`` as its runs of source items (or itself, left to be rendered item by item,
    where as_runs would keep it whole), if they are all tensor records or all dicts of string
    keys and tensor records; else None."""
    if len(items) < RUNS_FROM:
        return None
    kinds = set(map(type, items))
    if kinds == {TensorRef}:
        marks: list[Any] = list(zip(map(_DTYPE, items), map(_NUMEL, items), strict=True))
    elif kinds == {dict}:
        marks = []
        for item in items:
            if not all(type(key) is str and type(ref) is TensorRef for key, ref in item.items()):
                return None
            # Equal as rendered dicts are: the same keys, in any order, with the same records.
            marks.append(frozenset((key, ref.dtype, ref.numel) for key, ref in item.items()))
    else:
        return None
    runs, at = [], 0
    for _, group in itertools.groupby(marks):
        count = sum(1 for _ in group)
        runs.append([count, items[at]])
        at += count
    return {"__runs__": runs} if len(runs) * 4 <= len(items) else items
