"""Split model tensors into safetensors shards the way transformers does.

transformers ``modeling_utils.PreTrainedModel.save_pretrained`` / huggingface_hub
``split_torch_state_dict_into_shards``: tensors are packed in order into shards of at most
``max_shard_size`` bytes (a tensor larger than the limit gets a shard of its own), files are
named ``model-00001-of-0000N.safetensors`` and listed in ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from exporter.records import TensorJob

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; ints pass through."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    return int(float(m[1]) * _UNITS[(m[2] or "").upper()])


def plan_shards(
    jobs: Sequence[TensorJob], nbytes: Sequence[int], max_shard_size: int
) -> list[list[TensorJob]]:
    """Group ``jobs`` (output sizes ``nbytes``) into shards, in order (file names:
    :func:`exporter.archive.layout.model_shard_files`)."""
    groups: list[list[TensorJob]] = [[]]
    size = 0
    for job, n in zip(jobs, nbytes, strict=True):
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += n
    return groups
