"""The non-tensor state of partition files, as ``state.json`` shows it.

Every value of a partition file is kept (``optimizer.files`` in ``state.json``), its tensors
described as ``{"__partition__": dtype, "numel": n}``. A file of DeeperSpeed with a small
``reduce_bucket_size`` holds one sub-partition per comm interval (tens of thousands, nearly all
alike), so a long list whose consecutive items repeat is written as its runs:
``{"__runs__": [[count, item], ...]}``, which keeps every value and its order. Measured on
eight files of 12,000 comm intervals each: 38 MB of ``state.json`` before, and most of a
many-interval export's time after the tensors went into writing it.
"""

from __future__ import annotations

from typing import Any

from exporter.torchfile import TorchFile, to_json

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
        return as_runs(to_json(tf.obj, tensor=tensor))
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
