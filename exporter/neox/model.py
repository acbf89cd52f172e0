"""Plan the model-weight tensors of one checkpoint: names, shapes, and how to read them.

Pipeline saves keep one file per (layer, tensor-parallel rank); the non-pipeline
("sequential") form keeps every weight in ``mp_rank_XX_model_states.pt['module']`` under
``sequential.{idx}.`` names (GPT-NeoX ``convert_neox_to_hf.py`` ``get_state``). The
architecture (:mod:`exporter.neox.arch`) picks the name tables, each block file's keys its MLP
naming (:mod:`exporter.neox.names`). Each Hugging Face tensor becomes one
:class:`~exporter.records.TensorJob` described by an :class:`OutputRule`, which the optimizer
plan reuses for masters and moments; with one tensor-parallel rank it streams straight from the
source file, otherwise the shards are merged (or, for q/k/v and up/gate, gathered row range by
row range: :mod:`exporter.neox.layout`) one chunk at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.dtypes import DType, from_torch, to_torch
from exporter.errors import LayoutError
from exporter.neox.arch import ModelSpec, model_spec, refuse_unsupported
from exporter.neox.checkpoint import CheckpointFiles
from exporter.neox.layout import RowRanges, gathered_chunks, part_shape, split_rows
from exporter.neox.names import (
    MappedName,
    Merge,
    is_extra_state,
    layer_role,
    map_name_lenient,
    mlp_naming,
    resolve_merge,
    split_module_name,
)
from exporter.records import SAFETENSORS_DTYPES, Place, TensorJob, reads_into, takes_place
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
    dtype: DType
    shards: dict[int, list[dict[str, TensorRef]]] = field(default_factory=dict, repr=False)
    spec: ModelSpec | None = None
    outputs: dict[str, list[OutputRule]] = field(default_factory=dict, repr=False)
    state_jobs: list[TensorJob] = field(default_factory=list, repr=False)
    config_source: str = ""


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


def merge_shards(arrays: list[np.ndarray], merge: Merge, dtype: DType) -> np.ndarray:
    """Combine tensor-parallel shards (arrays of ``dtype``'s numpy type) exactly as GPT-NeoX's
    HF converter does: sums and averages in torch (imported then), in the shards' dtype, so
    half-precision values round as they do there."""
    if len(arrays) == 1 or merge in (Merge.FIRST, Merge.REPLICATED):
        return arrays[0]
    if merge is Merge.CONCAT_DIM0:
        return np.concatenate(arrays, axis=0)
    if merge is Merge.CONCAT_DIM1:
        return np.concatenate(arrays, axis=1)
    tensors = [to_torch(a, dtype) for a in arrays]
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t  # `sum(list)` in the source: left to right, in the tensors' dtype
    return from_torch(total / len(tensors) if merge is Merge.AVERAGE else total)[0]


@dataclass
class Shard:
    """One tensor-parallel shard as the streaming merge reads it."""

    shape: tuple[int, ...]
    element_size: int
    chunks: Callable[[int], Iterator[np.ndarray]]
    read_range: Callable[[int, int], np.ndarray]  # flat elements [start, start + count)
    dtype: DType | None = None  # for sums and averages (merge_shards)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


def merged_chunks(
    shards: list[Shard], merge: Merge, on_mismatch: Callable[[], None] | None = None
) -> Callable[[int], Iterator[np.ndarray]]:
    """Chunks of the merged tensor, read shard piece by shard piece: memory stays at about one
    chunk per shard, never the whole merged tensor (row-parallel weights go by blocks of rows;
    sums and averages are element-wise, so they go by aligned flat ranges).

    ``Merge.REPLICATED`` yields rank 0's copy and compares the others with it bitwise; on a
    difference it calls ``on_mismatch`` (which raises, by default)."""
    if len(shards) == 1 or merge is Merge.FIRST:
        return shards[0].chunks
    if merge is Merge.CONCAT_DIM0:
        def concat0(max_bytes: int, place: Place | None = None) -> Iterator[np.ndarray]:
            for shard in shards:
                yield from shard.chunks(max_bytes, place) if place else shard.chunks(max_bytes)

        return reads_into(concat0) if all(takes_place(s.chunks) for s in shards) else concat0
    size = shards[0].element_size
    if merge is Merge.CONCAT_DIM1:
        rows = shards[0].shape[0]
        widths = [math.prod(s.shape[1:]) for s in shards]

        def concat1(max_bytes: int) -> Iterator[np.ndarray]:
            block = max(1, max_bytes // max(1, sum(widths) * size))
            for r0 in range(0, rows, block):
                n = min(block, rows - r0)
                parts = [s.read_range(r0 * w, n * w).reshape(n, w) for s, w in zip(shards, widths, strict=True)]
                yield np.concatenate(parts, axis=1).reshape(-1)

        return concat1
    if merge is Merge.ROW_BIAS:
        raise ValueError("resolve Merge.ROW_BIAS (names.resolve_merge) before merging")
    numel = math.prod(shards[0].shape)

    def mismatch() -> None:
        raise LayoutError("tensor-parallel ranks hold different copies of a tensor GPT-NeoX "
                          "keeps identical on every rank (a row-parallel bias without "
                          "gpt-j-residual?)")

    def elementwise(max_bytes: int) -> Iterator[np.ndarray]:
        step = max(1, max_bytes // size)
        for start in range(0, numel, step):
            n = min(step, numel - start)
            parts = [s.read_range(start, n) for s in shards]
            if merge is Merge.REPLICATED:
                if not all(_same_bits(parts[0], p) for p in parts[1:]):
                    (on_mismatch or mismatch)()
                yield parts[0]
            else:
                yield merge_shards(parts, merge, shards[0].dtype or _no_dtype())

    return elementwise


def _no_dtype() -> DType:
    raise ValueError("sums and averages of shards need the shards' Shard.dtype")


def _tensor_shard(ref: TensorRef) -> Shard:
    return Shard(ref.shape, ref.element_size, ref.iter_chunks, ref.read_range, ref.dtype)


@dataclass(frozen=True)
class OutputRule:
    """How one Hugging Face tensor is built from the tensor-parallel shards of one source key.

    Attributes:
        merge: the rule for model weights and fp32 masters (row-parallel biases resolved).
        table_merge: the name table's rule (``Merge.ROW_BIAS`` kept, for Adam's moments).
        ranges: for a part of a split tensor (q/k/v, up/gate), its rows in each rank's shard.
    """

    hf_name: str
    kind: str
    shape: tuple[int, ...]
    merge: Merge
    table_merge: Merge
    block: int | None
    ranges: RowRanges | None = None

    def chunks(self, shards: list[Shard],
               on_mismatch: Callable[[], None] | None = None,
               merge: Merge | None = None) -> Callable[[int], Iterator[np.ndarray]]:
        """Chunks of this output from its shards (``merge`` overrides :attr:`merge`)."""
        if self.ranges is not None:
            return gathered_chunks([s.read_range for s in shards], shards[0].shape,
                                   shards[0].element_size, self.ranges)

        def refuse() -> None:
            raise LayoutError(f"{self.hf_name}: tensor-parallel ranks hold different copies of a "
                              "tensor GPT-NeoX keeps identical on every rank (a row-parallel bias "
                              "without gpt-j-residual?)")

        return merged_chunks(shards, merge or self.merge, on_mismatch or refuse)


def _tensor_dict(obj: Any, where: str) -> dict[str, TensorRef]:
    if not isinstance(obj, dict):
        raise LayoutError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(key, str) and value is None and is_extra_state(key):
            continue  # Transformer Engine modules without FP8 metadata save None
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


QKV = "attention.query_key_value.weight"


def _spec(layers: dict[int, list[dict[str, TensorRef]]], cfg: dict[str, Any],
          folder: Any, from_yaml: bool) -> ModelSpec:
    """The architecture, from the config and the first block's and the embedding's tensors."""
    block = layers.get(2)
    embedding = layers.get(0)
    if not block or not embedding or "word_embeddings.weight" not in embedding[0]:
        raise LayoutError(f"{folder}: checkpoint has no word_embeddings.weight or no "
                          "transformer layer 0 (missing layer file?)")
    keys = set(block[0]) | set(embedding[0])
    refuse_unsupported(cfg, keys)  # before asking for attention weights a Mamba block lacks
    if QKV not in block[0]:
        raise LayoutError(f"{folder}: checkpoint has no {QKV} in transformer layer 0 "
                          f"(keys: {', '.join(sorted(block[0]))})")
    rotary = block[0].get("attention.rotary_emb.inv_freq")
    return model_spec(
        cfg, keys,
        hidden_size=embedding[0]["word_embeddings.weight"].shape[1],
        qkv_rows=sum(rank[QKV].shape[0] for rank in block),
        rotary_dims=2 * rotary.numel if rotary is not None else None,
        from_yaml=from_yaml,
    )


def _rules(mapped: MappedName, refs: list[TensorRef], spec: ModelSpec) -> list[OutputRule]:
    merge = resolve_merge(mapped.merge, spec.gpt_j_residual)
    if mapped.split is None:
        shape = merged_shape([r.shape for r in refs], merge)
        return [OutputRule(mapped.hf_name, mapped.kind, shape, merge, mapped.merge, mapped.block)]
    if len({r.shape for r in refs}) != 1:
        raise LayoutError(f"tensor-parallel shards of {mapped.hf_names} differ in shape")
    parts = split_rows(mapped.split, refs[0].shape[0], len(refs), spec.heads)
    return [OutputRule(name, mapped.kind, part_shape(refs[0].shape, ranges, len(refs)), merge,
                       mapped.merge, mapped.block, ranges)
            for name, ranges in zip(mapped.hf_names, parts, strict=True)]


def plan_model(files: CheckpointFiles, cfg: dict[str, Any]) -> ModelPlan:
    """Every model tensor of the checkpoint as a job under its Hugging Face name.

    Raises:
        LayoutError, NameMappingError: files disagree with each other or with GPT-NeoX;
            :class:`~exporter.neox.arch.UnsupportedModelError` for a model no transformers
            class computes.
    """
    num_layers = infer_num_layers(files, cfg)
    if files.is_pipeline:
        _check_layer_files(files, num_layers)
    jobs: list[TensorJob] = []
    state_jobs: list[TensorJob] = []
    outputs: dict[str, list[OutputRule]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[DType] = set()
    layers = layer_sources(files)
    tp_size = max(len(r) for r in layers.values()) if layers else 1
    spec = _spec(layers, cfg, files.folder, from_yaml=bool(files.configs))
    for layer in sorted(layers):
        ranks = layers[layer]
        keys = list(ranks[0])
        for tp, rank in enumerate(ranks[1:], start=1):
            if set(rank) != set(keys):
                raise LayoutError(
                    f"layer {layer:02d}: tensor-parallel rank {tp} holds keys {sorted(rank)}, "
                    f"rank 0 holds {sorted(keys)}"
                )
        naming = "legacy"
        if layer_role(layer, num_layers)[0] == "block":
            naming = mlp_naming(set(keys), f"{files.folder}: layer {layer:02d}")
        for key in keys:
            refs = [rank[key] for rank in ranks]
            if is_extra_state(key):
                for tp, ref in enumerate(refs):
                    name = f"layer_{layer:02d}-model_{tp:02d}.{key}"
                    state_jobs.append(TensorJob(name, "state", ref.dtype, ref.shape,
                                                ref.iter_chunks, neox_name=f"{layer}.{key}"))
                continue
            mapped, known = map_name_lenient(layer, key, num_layers, spec.family, naming)
            if not known:
                log.warning("layer %02d: unknown key %r kept as buffer %s (tensor-parallel "
                            "rank 0's copy)", layer, key, mapped.hf_name)
            if len({r.dtype for r in refs}) != 1:
                raise LayoutError(f"layer {layer:02d} {key}: shards differ in dtype")
            if refs[0].dtype not in SAFETENSORS_DTYPES:
                raise LayoutError(
                    f"{refs[0].path}: {key} has dtype {refs[0].dtype}, which safetensors cannot hold"
                )
            rules = _rules(mapped, refs, spec)
            outputs[f"{layer}.{key}"] = rules
            shards = [_tensor_shard(r) for r in refs]
            for rule in rules:
                shapes[rule.hf_name] = rule.shape
                if rule.kind == "model":
                    dtypes.add(refs[0].dtype)
                jobs.append(TensorJob(name=rule.hf_name, kind=rule.kind, dtype=refs[0].dtype,
                                      shape=rule.shape, chunks=rule.chunks(shards),
                                      neox_name=f"{layer}.{key}", layer=rule.block))
    embed, mlp_in = REQUIRED[spec.family]
    for name in (embed, mlp_in):
        if name not in shapes:
            raise LayoutError(f"{files.folder}: checkpoint has no {name} (missing layer file?)")
    blocks = {j.layer for j in jobs if j.layer is not None}
    if blocks != set(range(num_layers)):
        missing = sorted(set(range(num_layers)) - blocks)
        raise LayoutError(f"{files.folder}: transformer layers {missing} have no weights")
    if len(dtypes) != 1:
        raise LayoutError(f"{files.folder}: model weights mix dtypes {sorted(map(str, dtypes))}")
    if spec.assumed:
        log.warning("%s: settings not in the checkpoint, GPT-NeoX defaults assumed: %s",
                    files.folder, spec.assumed)
    return ModelPlan(
        jobs=jobs,
        num_layers=num_layers,
        tp_size=tp_size,
        vocab_size=shapes[embed][0],
        hidden_size=shapes[embed][1],
        intermediate_size=shapes[mlp_in][0],
        dtype=dtypes.pop(),
        shards=layers,
        spec=spec,
        outputs=outputs,
        state_jobs=state_jobs,
        config_source="YAML config" if files.configs else f"{files.mp_files[0].name} args",
    )


# family -> (embedding, the first block's MLP input whose rows are the MLP width)
REQUIRED = {
    "gpt_neox": ("gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"),
    "llama": ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"),
}
