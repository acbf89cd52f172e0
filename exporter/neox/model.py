"""Plan the model-weight tensors of one checkpoint: names, shapes, and how to read them.

Pipeline saves keep one file per (layer, tensor-parallel rank); the non-pipeline
("sequential") form keeps every weight in ``mp_rank_XX_model_states.pt['module']`` under
``sequential.{idx}.`` names (GPT-NeoX ``convert_neox_to_hf.py`` ``get_state``). Either way
each output tensor becomes one :class:`~exporter.records.TensorJob`; with one
tensor-parallel rank it streams straight from the source file, otherwise the shards are
merged in memory one tensor at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from exporter.errors import LayoutError
from exporter.neox.checkpoint import CheckpointFiles
from exporter.neox.names import Merge, map_name_lenient, split_module_name
from exporter.records import SAFETENSORS_DTYPES, TensorJob
from exporter.torchfile import TensorRef, load_torch_file

log = logging.getLogger(__name__)


@dataclass
class ModelPlan:
    """The model tensors of a checkpoint and the sizes read off them."""

    jobs: list[TensorJob]
    num_layers: int
    tp_size: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    shards: dict[int, list[dict[str, TensorRef]]] = field(default_factory=dict, repr=False)


def merged_shape(shapes: list[tuple[int, ...]], merge: Merge) -> tuple[int, ...]:
    first = shapes[0]
    if merge in (Merge.CONCAT_DIM0, Merge.CONCAT_DIM1):
        dim = 0 if merge is Merge.CONCAT_DIM0 else 1
        if any(len(s) <= dim or s[:dim] + s[dim + 1 :] != first[:dim] + first[dim + 1 :] for s in shapes):
            raise LayoutError(f"tensor-parallel shards of shapes {shapes} cannot concatenate on dim {dim}")
        return first[:dim] + (sum(s[dim] for s in shapes),) + first[dim + 1 :]
    if any(s != first for s in shapes):
        raise LayoutError(f"tensor-parallel replicas differ in shape: {shapes}")
    return first


def merge_shards(tensors: list[torch.Tensor], merge: Merge) -> torch.Tensor:
    """Combine tensor-parallel shards exactly as GPT-NeoX's HF converter does."""
    if len(tensors) == 1 or merge is Merge.FIRST:
        return tensors[0]
    if merge is Merge.CONCAT_DIM0:
        return torch.cat(tensors, dim=0)
    if merge is Merge.CONCAT_DIM1:
        return torch.cat(tensors, dim=1)
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t  # `sum(list)` in the source: left to right, in the tensors' dtype
    return total / len(tensors) if merge is Merge.AVERAGE else total


@dataclass
class Shard:
    """One tensor-parallel shard as the streaming merge reads it."""

    shape: tuple[int, ...]
    element_size: int
    chunks: Callable[[int], Iterator[torch.Tensor]]
    read_range: Callable[[int, int], torch.Tensor]  # flat elements [start, start + count)


def merged_chunks(shards: list[Shard], merge: Merge) -> Callable[[int], Iterator[torch.Tensor]]:
    """Chunks of the merged tensor, read shard piece by shard piece: memory stays at about one
    chunk per shard, never the whole merged tensor (row-parallel weights go by blocks of rows;
    sums and averages are element-wise, so they go by aligned flat ranges)."""
    if len(shards) == 1 or merge is Merge.FIRST:
        return shards[0].chunks
    if merge is Merge.CONCAT_DIM0:
        def concat0(max_bytes: int) -> Iterator[torch.Tensor]:
            for shard in shards:
                yield from shard.chunks(max_bytes)

        return concat0
    size = shards[0].element_size
    if merge is Merge.CONCAT_DIM1:
        rows = shards[0].shape[0]
        widths = [math.prod(s.shape[1:]) for s in shards]

        def concat1(max_bytes: int) -> Iterator[torch.Tensor]:
            block = max(1, max_bytes // max(1, sum(widths) * size))
            for r0 in range(0, rows, block):
                n = min(block, rows - r0)
                parts = [s.read_range(r0 * w, n * w).reshape(n, w) for s, w in zip(shards, widths, strict=True)]
                yield torch.cat(parts, dim=1).reshape(-1)

        return concat1
    numel = math.prod(shards[0].shape)

    def elementwise(max_bytes: int) -> Iterator[torch.Tensor]:
        step = max(1, max_bytes // size)
        for start in range(0, numel, step):
            n = min(step, numel - start)
            yield merge_shards([s.read_range(start, n) for s in shards], merge)

    return elementwise


def _tensor_shard(ref: TensorRef) -> Shard:
    return Shard(ref.shape, ref.element_size, ref.iter_chunks, ref.read_range)


def _shard_chunks(refs: list[TensorRef], merge: Merge) -> Callable[[int], Iterator[torch.Tensor]]:
    return merged_chunks([_tensor_shard(r) for r in refs], merge)


def _tensor_dict(obj: Any, where: str) -> dict[str, TensorRef]:
    if not isinstance(obj, dict):
        raise LayoutError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, TensorRef):
            raise LayoutError(f"{where}: entry {key!r} is not a named tensor")
        out[key] = value
    return out


def infer_num_layers(files: CheckpointFiles, cfg: dict[str, Any]) -> int:
    if cfg.get("num_layers") is not None:
        return int(cfg["num_layers"])
    if files.layer_files:
        return max(files.layer_indices) - 4
    raise LayoutError(f"{files.folder}: cannot tell the number of layers (no num-layers in config)")


def layer_sources(files: CheckpointFiles) -> dict[int, list[dict[str, TensorRef]]]:
    """pipeline layer index -> one {key: tensor} per tensor-parallel rank."""
    layers: dict[int, list[dict[str, TensorRef]]] = {}
    if files.is_pipeline:
        for layer in files.layer_indices:
            ranks = []
            for tp in files.tp_ranks:
                path = files.layer_files[(layer, tp)]
                ranks.append(_tensor_dict(load_torch_file(path).obj, str(path)))
            layers[layer] = ranks
        return layers
    for mp in sorted(files.mp_files):
        path = files.mp_files[mp]
        root = load_torch_file(path).obj
        module = root.get("module") if isinstance(root, dict) else None
        if module is None:
            raise LayoutError(f"{path}: no layer files and no 'module' weights in the engine state")
        for name, ref in _tensor_dict(module, f"{path}['module']").items():
            layer, key = split_module_name(name)
            ranks = layers.setdefault(layer, [])
            while len(ranks) <= mp:
                ranks.append({})
            ranks[mp][key] = ref
    return layers


def _check_layer_files(files: CheckpointFiles, num_layers: int) -> None:
    """Every pipeline layer with parameters has its file (names per DeepSpeed
    ``PipelineModule.ckpt_layer_path``); the first missing one is named."""
    expected = [0, *range(2, num_layers + 2), num_layers + 3, num_layers + 4]
    have = set(files.layer_indices)
    for layer in expected:
        if layer not in have:
            raise LayoutError(
                f"{files.folder}: missing layer_{layer:02d}-model_00-model_states.pt "
                f"(a {num_layers}-layer model has pipeline layers {expected[0]}, "
                f"{expected[1]}..{expected[-3]}, {expected[-2]}, {expected[-1]})"
            )


def plan_model(files: CheckpointFiles, cfg: dict[str, Any]) -> ModelPlan:
    """Every model tensor of the checkpoint as a job under its Hugging Face name.

    Raises:
        LayoutError, NameMappingError: files disagree with each other or with GPT-NeoX.
    """
    num_layers = infer_num_layers(files, cfg)
    if files.is_pipeline:
        _check_layer_files(files, num_layers)
    jobs: list[TensorJob] = []
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[torch.dtype] = set()
    layers = layer_sources(files)
    tp_size = max(len(r) for r in layers.values()) if layers else 1
    for layer in sorted(layers):
        ranks = layers[layer]
        keys = list(ranks[0])
        for tp, rank in enumerate(ranks[1:], start=1):
            if set(rank) != set(keys):
                raise LayoutError(
                    f"layer {layer:02d}: tensor-parallel rank {tp} holds keys {sorted(rank)}, "
                    f"rank 0 holds {sorted(keys)}"
                )
        for key in keys:
            mapped, known = map_name_lenient(layer, key, num_layers)
            if not known:
                log.warning("layer %02d: unknown key %r kept as buffer %s (tensor-parallel "
                            "rank 0's copy)", layer, key, mapped.hf_name)
            refs = [rank[key] for rank in ranks]
            if len({r.dtype for r in refs}) != 1:
                raise LayoutError(f"layer {layer:02d} {key}: shards differ in dtype")
            if refs[0].dtype not in SAFETENSORS_DTYPES:
                raise LayoutError(
                    f"{refs[0].path}: {key} has dtype {refs[0].dtype}, which safetensors cannot hold"
                )
            shape = merged_shape([r.shape for r in refs], mapped.merge)
            shapes[mapped.hf_name] = shape
            if mapped.kind == "model":
                dtypes.add(refs[0].dtype)
            jobs.append(
                TensorJob(
                    name=mapped.hf_name,
                    kind=mapped.kind,
                    dtype=refs[0].dtype,
                    shape=shape,
                    chunks=_shard_chunks(refs, mapped.merge),
                    neox_name=f"{layer}.{key}",
                    layer=mapped.block,
                )
            )
    required = ("gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight")
    for name in required:
        if name not in shapes:
            raise LayoutError(f"{files.folder}: checkpoint has no {name} (missing layer file?)")
    blocks = {j.layer for j in jobs if j.layer is not None}
    if blocks != set(range(num_layers)):
        missing = sorted(set(range(num_layers)) - blocks)
        raise LayoutError(f"{files.folder}: transformer layers {missing} have no weights")
    if len(dtypes) != 1:
        raise LayoutError(f"{files.folder}: model weights mix dtypes {sorted(map(str, dtypes))}")
    return ModelPlan(
        jobs=jobs,
        num_layers=num_layers,
        tp_size=tp_size,
        vocab_size=shapes["gpt_neox.embed_in.weight"][0],
        hidden_size=shapes["gpt_neox.embed_in.weight"][1],
        intermediate_size=shapes["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][0],
        dtype=dtypes.pop(),
        shards=layers,
    )
