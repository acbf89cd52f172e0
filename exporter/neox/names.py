"""GPT-NeoX pipeline layer names -> Hugging Face ``GPTNeoXForCausalLM`` names, and TP merge rules.

One table, one lookup, one clear error. Sources:
- layer indices: GPT-NeoX ``megatron/model/gpt2_model.py`` ``GPT2ModelPipe.init_specs``:
  0 = ``EmbeddingPipe``, 1 = a parameter-free function, 2..N+1 = ``ParallelTransformerLayerPipe``,
  N+2 = function, N+3 = ``NormPipe``, N+4 = ``ParallelLinearPipe`` (final_linear).
- merge rules: GPT-NeoX ``tools/ckpts/convert_neox_to_hf.py`` ``MODEL_KEYS["neox"]`` and
  ``convert``: column-parallel weights and biases concatenate on dim 0, row-parallel weights on
  dim 1, row-parallel biases are summed, norms averaged, the rotary buffer taken from rank 0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from exporter.errors import NameMappingError


class Merge(enum.Enum):
    """How tensor-parallel shards of one parameter combine."""

    CONCAT_DIM0 = "concat0"
    CONCAT_DIM1 = "concat1"
    SUM = "sum"
    AVERAGE = "average"
    FIRST = "first"


# key inside a block's layer file -> (key under gpt_neox.layers.{i}., merge rule, kind)
BLOCK_KEYS: dict[str, tuple[str, Merge, str]] = {
    "input_layernorm.weight": ("input_layernorm.weight", Merge.AVERAGE, "model"),
    "input_layernorm.bias": ("input_layernorm.bias", Merge.AVERAGE, "model"),
    "attention.query_key_value.weight": ("attention.query_key_value.weight", Merge.CONCAT_DIM0, "model"),
    "attention.query_key_value.bias": ("attention.query_key_value.bias", Merge.CONCAT_DIM0, "model"),
    "attention.rotary_emb.inv_freq": ("attention.rotary_emb.inv_freq", Merge.FIRST, "buffer"),
    "attention.dense.weight": ("attention.dense.weight", Merge.CONCAT_DIM1, "model"),
    "attention.dense.bias": ("attention.dense.bias", Merge.SUM, "model"),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", Merge.AVERAGE, "model"),
    "post_attention_layernorm.bias": ("post_attention_layernorm.bias", Merge.AVERAGE, "model"),
    "mlp.dense_h_to_4h.weight": ("mlp.dense_h_to_4h.weight", Merge.CONCAT_DIM0, "model"),
    "mlp.dense_h_to_4h.bias": ("mlp.dense_h_to_4h.bias", Merge.CONCAT_DIM0, "model"),
    "mlp.dense_4h_to_h.weight": ("mlp.dense_4h_to_h.weight", Merge.CONCAT_DIM1, "model"),
    "mlp.dense_4h_to_h.bias": ("mlp.dense_4h_to_h.bias", Merge.SUM, "model"),
}

# layer role -> key in its layer file -> (Hugging Face name, merge rule, kind)
EDGE_KEYS: dict[str, dict[str, tuple[str, Merge, str]]] = {
    "embedding": {"word_embeddings.weight": ("gpt_neox.embed_in.weight", Merge.CONCAT_DIM0, "model")},
    "final_norm": {
        "norm.weight": ("gpt_neox.final_layer_norm.weight", Merge.AVERAGE, "model"),
        "norm.bias": ("gpt_neox.final_layer_norm.bias", Merge.AVERAGE, "model"),
    },
    "final_linear": {"final_linear.weight": ("embed_out.weight", Merge.CONCAT_DIM0, "model")},
}


@dataclass(frozen=True)
class MappedName:
    """A GPT-NeoX tensor's Hugging Face identity."""

    hf_name: str
    merge: Merge
    kind: str
    block: int | None


def layer_role(layer_index: int, num_layers: int) -> tuple[str, int | None]:
    """The role of pipeline layer ``layer_index`` in a model of ``num_layers`` blocks."""
    if layer_index == 0:
        return "embedding", None
    if 2 <= layer_index <= num_layers + 1:
        return "block", layer_index - 2
    if layer_index == num_layers + 3:
        return "final_norm", None
    if layer_index == num_layers + 4:
        return "final_linear", None
    raise NameMappingError(
        f"pipeline layer {layer_index} holds no parameters in a {num_layers}-layer GPT-NeoX model"
    )


def map_name(layer_index: int, key: str, num_layers: int) -> MappedName:
    """Hugging Face name and merge rule of ``key`` in pipeline layer ``layer_index``.

    Raises:
        NameMappingError: the key is not part of a GPT-NeoX model.
    """
    role, block = layer_role(layer_index, num_layers)
    if role == "block":
        entry = BLOCK_KEYS.get(key)
        if entry is None:
            raise NameMappingError(
                f"unknown key {key!r} in transformer layer file {layer_index:02d}; "
                f"known: {', '.join(BLOCK_KEYS)}"
            )
        hf_key, merge, kind = entry
        return MappedName(f"gpt_neox.layers.{block}.{hf_key}", merge, kind, block)
    entry = EDGE_KEYS[role].get(key)
    if entry is None:
        raise NameMappingError(
            f"unknown key {key!r} in {role} layer file {layer_index:02d}; "
            f"known: {', '.join(EDGE_KEYS[role])}"
        )
    hf_name, merge, kind = entry
    return MappedName(hf_name, merge, kind, None)


def map_name_lenient(layer_index: int, key: str, num_layers: int) -> tuple[MappedName, bool]:
    """:func:`map_name`, or for a key GPT-NeoX's converter does not know, a name that keeps the
    tensor (``gpt_neox.layers.{i}.{key}`` in blocks, ``gpt_neox.pipe_layer_{idx}.{key}``
    elsewhere) as kind ``buffer``, so nothing in the source is dropped. The flag says whether
    the name was known."""
    try:
        return map_name(layer_index, key, num_layers), True
    except NameMappingError:
        if 2 <= layer_index <= num_layers + 1:
            block: int | None = layer_index - 2
            name = f"gpt_neox.layers.{block}.{key}"
        else:
            block, name = None, f"gpt_neox.pipe_layer_{layer_index}.{key}"
        return MappedName(name, Merge.FIRST, "buffer", block), False


def split_module_name(name: str) -> tuple[int, str]:
    """``"2.attention.dense.weight"`` -> ``(2, "attention.dense.weight")`` (DeepSpeed param names).

    Accepts the ``sequential.`` prefix of non-pipeline saves (``sequential.2.attention...``) and
    ``module.`` prefixes.
    """
    parts = name.split(".")
    while parts and parts[0] in ("sequential", "module"):
        parts = parts[1:]
    if len(parts) < 2 or not parts[0].isdigit():
        raise NameMappingError(f"parameter name {name!r} does not start with a layer index")
    return int(parts[0]), ".".join(parts[1:])


def hf_merge_rule(hf_name: str) -> Merge | None:
    """The tensor-parallel merge rule of a Hugging Face name (None if unknown)."""
    for entries in EDGE_KEYS.values():
        for hf, merge, _ in entries.values():
            if hf == hf_name:
                return merge
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[:2] == ["gpt_neox", "layers"]:
        entry = BLOCK_KEYS.get(".".join(parts[3:]))
        return entry[1] if entry else None
    return None
