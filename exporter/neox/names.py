"""GPT-NeoX pipeline layer names -> Hugging Face names, and tensor-parallel merge rules.

Tables, one lookup, one clear error. Sources:
- layer indices: GPT-NeoX ``megatron/model/gpt2_model.py`` ``GPT2ModelPipe.init_specs``:
  0 = ``EmbeddingPipe``, 1 = a parameter-free function, 2..N+1 = ``ParallelTransformerLayerPipe``,
  N+2 = function, N+3 = ``NormPipe``, N+4 = ``ParallelLinearPipe`` (final_linear).
- module names: ``megatron/model/transformer.py``: the MLP was ``dense_h_to_4h``/``dense_4h_to_h``
  (Pythia era), is ``linear1``/``linear2`` (``ParallelMLP``) today, ``w1``/``w2``/``w3`` in the
  old ``LLaMAParallelMLP``, and Transformer Engine's ``LayerNormMLP`` (``transformer_engine.py``
  ``TELayerNormMLP``) holds ``fc1_weight``/``fc2_weight`` and the post-attention norm as
  ``layer_norm_weight``. RMSNorm (``megatron/model/norms.py``) stores its weight as ``scale``.
- merge rules (``megatron/mpu/layers.py``): column-parallel weights and biases are split on
  dim 0, row-parallel weights on dim 1, norms are replicated. A row-parallel bias is added
  after the all-reduce (``RowParallelLinear.forward``), so every rank holds the whole bias —
  except with ``gpt-j-residual``, where attention and MLP outputs, biases included, of all ranks
  are summed in one all-reduce (``ParallelTransformerLayer.forward``): then the ranks' biases
  add up. :data:`Merge.ROW_BIAS` marks them; :func:`resolve_merge` picks the rule.
- Hugging Face names: transformers ``GPTNeoXForCausalLM``, ``LlamaForCausalLM``.
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
    REPLICATED = "replicated"  # every rank holds the whole tensor: one copy, the others equal
    ROW_BIAS = "row_bias"  # a row-parallel bias: SUM with gpt-j-residual, else REPLICATED


class Split(enum.Enum):
    """A column-parallel tensor that Hugging Face keeps as several (see ``neox/layout.py``)."""

    QKV = "qkv"  # attention.query_key_value -> q_proj, k_proj, v_proj
    UP_GATE = "up_gate"  # a gated MLP's linear1 -> up_proj, gate_proj (Gated_Activation)


@dataclass(frozen=True)
class Entry:
    """Where one layer-file key goes: its Hugging Face key (several for a split), merge rule."""

    hf: tuple[str, ...]
    merge: Merge
    kind: str = "model"
    split: Split | None = None


def _e(hf: str, merge: Merge, kind: str = "model") -> Entry:
    return Entry((hf,), merge, kind)


def _split(split: Split, *hf: str) -> Entry:
    return Entry(tuple(hf), Merge.CONCAT_DIM0, "model", split)


ROTARY = "attention.rotary_emb.inv_freq"  # a persistent buffer in old GPT-NeoX

# family -> block key -> entry (keys under {prefix}.layers.{i}.)
ATTENTION_KEYS: dict[str, dict[str, Entry]] = {
    "gpt_neox": {
        "input_layernorm.weight": _e("input_layernorm.weight", Merge.AVERAGE),
        "input_layernorm.bias": _e("input_layernorm.bias", Merge.AVERAGE),
        "attention.query_key_value.weight": _e("attention.query_key_value.weight", Merge.CONCAT_DIM0),
        "attention.query_key_value.bias": _e("attention.query_key_value.bias", Merge.CONCAT_DIM0),
        ROTARY: _e(ROTARY, Merge.FIRST, "buffer"),
        "attention.dense.weight": _e("attention.dense.weight", Merge.CONCAT_DIM1),
        "attention.dense.bias": _e("attention.dense.bias", Merge.ROW_BIAS),
        "post_attention_layernorm.weight": _e("post_attention_layernorm.weight", Merge.AVERAGE),
        "post_attention_layernorm.bias": _e("post_attention_layernorm.bias", Merge.AVERAGE),
    },
    "llama": {
        "input_layernorm.scale": _e("input_layernorm.weight", Merge.AVERAGE),
        "attention.query_key_value.weight": _split(
            Split.QKV, "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "attention.query_key_value.bias": _split(
            Split.QKV, "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        ROTARY: _e("self_attn.rotary_emb.inv_freq", Merge.FIRST, "buffer"),
        "attention.dense.weight": _e("self_attn.o_proj.weight", Merge.CONCAT_DIM1),
        "attention.dense.bias": _e("self_attn.o_proj.bias", Merge.ROW_BIAS),
        "post_attention_layernorm.scale": _e("post_attention_layernorm.weight", Merge.AVERAGE),
    },
}

# family -> MLP naming -> block key -> entry. The naming is detected per layer file.
MLP_KEYS: dict[str, dict[str, dict[str, Entry]]] = {
    "gpt_neox": {
        "legacy": {
            "mlp.dense_h_to_4h.weight": _e("mlp.dense_h_to_4h.weight", Merge.CONCAT_DIM0),
            "mlp.dense_h_to_4h.bias": _e("mlp.dense_h_to_4h.bias", Merge.CONCAT_DIM0),
            "mlp.dense_4h_to_h.weight": _e("mlp.dense_4h_to_h.weight", Merge.CONCAT_DIM1),
            "mlp.dense_4h_to_h.bias": _e("mlp.dense_4h_to_h.bias", Merge.ROW_BIAS),
        },
        "linear": {
            "mlp.linear1.weight": _e("mlp.dense_h_to_4h.weight", Merge.CONCAT_DIM0),
            "mlp.linear1.bias": _e("mlp.dense_h_to_4h.bias", Merge.CONCAT_DIM0),
            "mlp.linear2.weight": _e("mlp.dense_4h_to_h.weight", Merge.CONCAT_DIM1),
            "mlp.linear2.bias": _e("mlp.dense_4h_to_h.bias", Merge.ROW_BIAS),
        },
        "transformer_engine": {
            "mlp.fc1_weight": _e("mlp.dense_h_to_4h.weight", Merge.CONCAT_DIM0),
            "mlp.fc1_bias": _e("mlp.dense_h_to_4h.bias", Merge.CONCAT_DIM0),
            "mlp.fc2_weight": _e("mlp.dense_4h_to_h.weight", Merge.CONCAT_DIM1),
            "mlp.fc2_bias": _e("mlp.dense_4h_to_h.bias", Merge.ROW_BIAS),
            "mlp.layer_norm_weight": _e("post_attention_layernorm.weight", Merge.AVERAGE),
            "mlp.layer_norm_bias": _e("post_attention_layernorm.bias", Merge.AVERAGE),
        },
    },
    "llama": {
        "linear": {
            "mlp.linear1.weight": _split(Split.UP_GATE, "mlp.up_proj.weight", "mlp.gate_proj.weight"),
            "mlp.linear1.bias": _split(Split.UP_GATE, "mlp.up_proj.bias", "mlp.gate_proj.bias"),
            "mlp.linear2.weight": _e("mlp.down_proj.weight", Merge.CONCAT_DIM1),
            "mlp.linear2.bias": _e("mlp.down_proj.bias", Merge.ROW_BIAS),
        },
        "llama_legacy": {  # LLaMAParallelMLP: w2(silu(w1(x)) * w3(x))
            "mlp.w1.weight": _e("mlp.gate_proj.weight", Merge.CONCAT_DIM0),
            "mlp.w3.weight": _e("mlp.up_proj.weight", Merge.CONCAT_DIM0),
            "mlp.w2.weight": _e("mlp.down_proj.weight", Merge.CONCAT_DIM1),
        },
        "transformer_engine": {
            "mlp.fc1_weight": _split(Split.UP_GATE, "mlp.up_proj.weight", "mlp.gate_proj.weight"),
            "mlp.fc1_bias": _split(Split.UP_GATE, "mlp.up_proj.bias", "mlp.gate_proj.bias"),
            "mlp.fc2_weight": _e("mlp.down_proj.weight", Merge.CONCAT_DIM1),
            "mlp.fc2_bias": _e("mlp.down_proj.bias", Merge.ROW_BIAS),
            "mlp.layer_norm_weight": _e("post_attention_layernorm.weight", Merge.AVERAGE),
        },
    },
}

# The key whose presence names a layer file's MLP naming.
MLP_MARKERS: dict[str, str] = {
    "mlp.dense_h_to_4h.weight": "legacy",
    "mlp.linear1.weight": "linear",
    "mlp.fc1_weight": "transformer_engine",
    "mlp.w1.weight": "llama_legacy",
}

# family -> layer role -> key in its layer file -> entry (full Hugging Face names)
EDGE_KEYS: dict[str, dict[str, dict[str, Entry]]] = {
    "gpt_neox": {
        "embedding": {"word_embeddings.weight": _e("gpt_neox.embed_in.weight", Merge.CONCAT_DIM0)},
        "final_norm": {
            "norm.weight": _e("gpt_neox.final_layer_norm.weight", Merge.AVERAGE),
            "norm.bias": _e("gpt_neox.final_layer_norm.bias", Merge.AVERAGE),
        },
        "final_linear": {"final_linear.weight": _e("embed_out.weight", Merge.CONCAT_DIM0)},
    },
    "llama": {
        "embedding": {"word_embeddings.weight": _e("model.embed_tokens.weight", Merge.CONCAT_DIM0)},
        "final_norm": {"norm.scale": _e("model.norm.weight", Merge.AVERAGE)},
        "final_linear": {"final_linear.weight": _e("lm_head.weight", Merge.CONCAT_DIM0)},
    },
}

BLOCK_PREFIX = {"gpt_neox": "gpt_neox.layers", "llama": "model.layers"}

def is_extra_state(key: str) -> bool:
    """Transformer Engine's per-module ``_extra_state`` (FP8 metadata): state, not weights."""
    return key == "_extra_state" or key.endswith("._extra_state")


def mlp_naming(keys: list[str] | set[str], where: str) -> str:
    """The MLP naming of one layer file, from its keys.

    Raises:
        NameMappingError: none of the known MLP names is there.
    """
    found = {naming for marker, naming in MLP_MARKERS.items() if marker in keys}
    if len(found) != 1:
        known = ", ".join(f"{m} ({n})" for m, n in MLP_MARKERS.items())
        what = "several MLP namings" if found else "no known MLP weight"
        raise NameMappingError(f"{where}: {what} among its keys; known: {known}")
    return found.pop()


@dataclass(frozen=True)
class MappedName:
    """A GPT-NeoX tensor's Hugging Face identity (``hf_names`` has several for a split)."""

    hf_names: tuple[str, ...]
    merge: Merge
    kind: str
    block: int | None
    split: Split | None = None

    @property
    def hf_name(self) -> str:
        return self.hf_names[0]


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


def block_table(family: str, naming: str) -> dict[str, Entry]:
    """Every key a block layer file of ``family`` with MLP ``naming`` may hold."""
    mlp = MLP_KEYS[family].get(naming)
    if mlp is None:
        raise NameMappingError(
            f"the {naming!r} MLP naming has no {family} equivalent "
            f"(known: {', '.join(MLP_KEYS[family])})"
        )
    return {**ATTENTION_KEYS[family], **mlp}


def map_name(layer_index: int, key: str, num_layers: int, family: str = "gpt_neox",
             naming: str = "legacy") -> MappedName:
    """Hugging Face name(s) and merge rule of ``key`` in pipeline layer ``layer_index``.

    Raises:
        NameMappingError: the key is not part of a GPT-NeoX model of this family and naming.
    """
    role, block = layer_role(layer_index, num_layers)
    if role == "block":
        table = block_table(family, naming)
        entry = table.get(key)
        if entry is None:
            raise NameMappingError(
                f"unknown key {key!r} in transformer layer file {layer_index:02d}; "
                f"known: {', '.join(table)}"
            )
        prefix = f"{BLOCK_PREFIX[family]}.{block}."
        return MappedName(tuple(prefix + h for h in entry.hf), entry.merge, entry.kind, block,
                          entry.split)
    entry = EDGE_KEYS[family][role].get(key)
    if entry is None:
        raise NameMappingError(
            f"unknown key {key!r} in {role} layer file {layer_index:02d}; "
            f"known: {', '.join(EDGE_KEYS[family][role])}"
        )
    return MappedName(entry.hf, entry.merge, entry.kind, None)


def map_name_lenient(layer_index: int, key: str, num_layers: int, family: str = "gpt_neox",
                     naming: str = "legacy") -> tuple[MappedName, bool]:
    """:func:`map_name`, or for a key GPT-NeoX's converter does not know, a name that keeps the
    tensor (``{prefix}.layers.{i}.{key}`` in blocks, ``{family}.pipe_layer_{idx}.{key}``
    elsewhere) as kind ``buffer``, so nothing in the source is dropped. The flag says whether
    the name was known."""
    try:
        return map_name(layer_index, key, num_layers, family, naming), True
    except NameMappingError:
        if 2 <= layer_index <= num_layers + 1:
            block: int | None = layer_index - 2
            name = f"{BLOCK_PREFIX[family]}.{block}.{key}"
        else:
            block, name = None, f"{BLOCK_PREFIX[family].split('.')[0]}.pipe_layer_{layer_index}.{key}"
        return MappedName((name,), Merge.FIRST, "buffer", block), False


def resolve_merge(merge: Merge, gpt_j_residual: bool) -> Merge:
    """The rule for model weights and fp32 masters: a row-parallel bias is summed only where
    GPT-NeoX sums it (gpt-j-residual), otherwise every rank holds the same whole bias."""
    if merge is Merge.ROW_BIAS:
        return Merge.SUM if gpt_j_residual else Merge.REPLICATED
    return merge


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
    for family, roles in EDGE_KEYS.items():
        for entries in roles.values():
            for entry in entries.values():
                if hf_name in entry.hf:
                    return entry.merge
        parts = hf_name.split(".")
        if len(parts) > 3 and ".".join(parts[:2]) == BLOCK_PREFIX[family]:
            rest = ".".join(parts[3:])
            tables = [ATTENTION_KEYS[family], *MLP_KEYS[family].values()]
            for table in tables:
                for entry in table.values():
                    if rest in entry.hf:
                        return entry.merge
    return None
