"""Which transformers architecture a GPT-NeoX checkpoint is, and its ``config.json``.

GPT-NeoX builds one block type whose parts are switched by settings
(``megatron/neox_arguments/neox_args.py``): ``norm`` (``layernorm``, ``rmsnorm`` ...),
``activation`` (gated ones such as ``swiglu`` chunk ``linear1`` in two: ``Gated_Activation``),
``num-kv-heads`` (grouped-query attention, ``gqa_project``), ``gpt-j-residual`` (parallel
residual), ``pos-emb``, ``sliding-window-width``, ``attention-config`` (per-layer attention
types, Mamba and RWKV blocks among them), ``moe-num-experts``. Two combinations have a
transformers equivalent:

- ``GPTNeoXForCausalLM``: LayerNorm, an ungated MLP, multi-head rotary attention, with or
  without the parallel residual (Pythia, GPT-NeoX-20B);
- ``LlamaForCausalLM`` (``MistralForCausalLM`` with a sliding window): RMSNorm, ``swiglu``,
  sequential residual, rotary over the whole head, multi-head or grouped-query attention
  (GPT-NeoX ``configs/llama/*.yml``, ``configs/mistral/*.yml``).

Anything else is refused with one line naming the setting, never exported as a model that
computes something else. Settings the checkpoint does not state (no YAML, and the engine's
``args`` hold only sizes: ``megatron/checkpointing.py`` ``save_ds_checkpoint``) are read off
the tensors where the tensors tell (norm type from ``scale`` keys, gating from ``linear1``'s
rows, kv heads from the QKV rows, rotary dims from ``inv_freq``) and otherwise take GPT-NeoX's
defaults, which the plan records as assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exporter.errors import LayoutError, UnsupportedModelError
from exporter.neox.config import hf_config
from exporter.neox.layout import Heads

if TYPE_CHECKING:
    from exporter.neox.model import ModelPlan

# neox_args.py defaults of the settings that change what the model computes.
NEOX_DEFAULTS: dict[str, Any] = {
    "norm": "layernorm",
    "activation": "gelu",
    "gpt_j_residual": False,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "layernorm_epsilon": 1.0e-5,
    "rms_norm_epsilon": 1.0e-8,
}
# GPT-NeoX activations whose gated form transformers' Llama MLP computes (act(gate) * up).
GATED_ACTIVATIONS = {"swiglu": "silu"}
SUPPORTED_ATTENTION = {"global", "flash"}


@dataclass
class ModelSpec:
    """What the checkpoint's model is, as far as the exported config needs."""

    family: str  # "gpt_neox" or "llama" (the name tables of neox/names.py)
    architecture: str  # GPTNeoXForCausalLM, LlamaForCausalLM or MistralForCausalLM
    gpt_j_residual: bool
    heads: Heads | None
    settings: dict[str, Any]  # the config values used, defaults filled in
    assumed: dict[str, Any] = field(default_factory=dict)  # defaults nothing in the source gave


def _setting(cfg: dict[str, Any], key: str, assumed: dict[str, Any] | None) -> Any:
    """A setting, or GPT-NeoX's default: what training used when a YAML config leaves it unset,
    an assumption (recorded in ``assumed``) when there is no YAML to say."""
    value = cfg.get(key)
    if value is None:
        value = NEOX_DEFAULTS[key]
        if assumed is not None:
            assumed[key] = value
    return value


def attention_types(cfg: dict[str, Any]) -> set[str]:
    """The attention types of ``attention-config`` (``[[["global"], 24]]`` and the like)."""
    config = cfg.get("attention_config")
    found: set[str] = set()
    if not isinstance(config, list):
        return found
    for item in config:
        types = item[0] if isinstance(item, list) and item else item
        for t in types if isinstance(types, list) else [types]:
            found.add(str(t))
    return found


def refuse_unsupported(cfg: dict[str, Any], block_keys: set[str]) -> None:
    """Refuse, in one line naming it, a feature no transformers class computes the same way.

    Raises:
        UnsupportedModelError: MoE, Transformer Engine attention, Mamba, RWKV, sparse attention,
            tied gpt-j norms, qk norms.
    """
    experts = cfg.get("moe_num_experts")
    if (isinstance(experts, int) and experts > 1) or any(".experts." in k or "router" in k
                                                          for k in block_keys):
        raise UnsupportedModelError("mixture-of-experts layers (moe-num-experts) cannot be exported")
    if any(k.startswith("attention.qkv.") or k.startswith("attention.proj.") for k in block_keys):
        raise UnsupportedModelError("Transformer Engine attention (te-mha) cannot be exported "
                                    "(its QKV layout is not read)")
    types = attention_types(cfg)
    # Module names of GPT-NeoX's ParallelMambaResidualLayer (megatron/model/mamba) and
    # RWKVResidualLayer (megatron/model/rwkv): they show without a config to say so.
    for kind, prefixes in (("mamba", ("mixer.",)), ("rwkv", ("att.", "ffn."))):
        if kind in types or any(k.startswith(prefixes) for k in block_keys):
            raise UnsupportedModelError(f"{kind} layers (attention-config) cannot be exported")
    other = sorted(types - SUPPORTED_ATTENTION)
    if other:
        raise UnsupportedModelError(f"attention type(s) {', '.join(other)} (attention-config) "
                                    "cannot be exported; only global/flash attention")
    if cfg.get("gpt_j_tied"):
        raise UnsupportedModelError("gpt-j-tied layer norms cannot be exported "
                                    "(no transformers model ties them)")
    if cfg.get("use_qk_layernorm") or any("qk_layernorm" in k for k in block_keys):
        raise UnsupportedModelError("use-qk-layernorm cannot be exported (no transformers "
                                    "GPTNeoX/Llama model normalises queries and keys)")


def model_spec(
    cfg: dict[str, Any],
    keys: set[str],
    *,
    hidden_size: int,
    qkv_rows: int,
    rotary_dims: int | None,
    from_yaml: bool = True,
) -> ModelSpec:
    """The architecture of a checkpoint from its config and the keys/shapes of its tensors.

    Args:
        keys: the keys of a transformer layer file and of the embedding layer file.
        hidden_size: the embedding width.
        qkv_rows: rows of the merged query_key_value weight (all ranks).
        rotary_dims: twice the length of the saved ``inv_freq`` buffer, if saved.
        from_yaml: ``cfg`` holds a YAML config (its unset settings are GPT-NeoX's defaults);
            otherwise only the checkpoint's args, and what the tensors cannot tell is assumed.

    Raises:
        UnsupportedModelError: a feature without a faithful transformers equivalent.
        LayoutError: the config disagrees with the tensors.
    """
    block_keys = keys
    refuse_unsupported(cfg, block_keys)
    found: dict[str, Any] = {}
    assumed = None if from_yaml else found
    norm = cfg.get("norm") or ("rmsnorm" if "input_layernorm.scale" in block_keys else None)
    if norm is None:
        norm = _setting(cfg, "norm", assumed)
    if cfg.get("activation") is None and norm == "rmsnorm" and not from_yaml:
        activation = found["activation"] = "swiglu"  # what GPT-NeoX's RMSNorm configs train
    else:
        activation = _setting(cfg, "activation", assumed)
    gpt_j = bool(_setting(cfg, "gpt_j_residual", assumed))
    pos_emb = cfg.get("pos_emb")
    if pos_emb is None and from_yaml:
        pos_emb = "learned"  # neox_args.py default
    elif pos_emb is None:
        # A learned position table sits in the embedding layer file (EmbeddingPipe); without one
        # the saved weights are those of rotary (or ALiBi, which the tensors cannot tell).
        pos_emb = "learned" if "position_embeddings.weight" in block_keys else "rotary"
        found["pos_emb"] = pos_emb
    if pos_emb != "rotary":
        raise UnsupportedModelError(f"pos-emb {pos_emb!r} cannot be exported (rotary only)")
    heads = cfg.get("num_attention_heads")
    if heads is None:
        raise LayoutError("the GPT-NeoX config has no num-attention-heads (neither a YAML "
                          "config nor the checkpoint's args give it)")
    heads = int(heads)
    if hidden_size % heads:
        raise LayoutError(f"hidden size {hidden_size} does not divide into {heads} heads")
    head_dim = hidden_size // heads
    kv = cfg.get("num_kv_heads")
    if kv is None and qkv_rows != 3 * hidden_size and not from_yaml:
        kv = (qkv_rows - hidden_size) // (2 * head_dim)  # gqa_project's [q; k; v] sizes
        found["num_kv_heads"] = f"{kv} (from the query_key_value rows)"
    kv = heads if kv is None else int(kv)
    if qkv_rows != hidden_size + 2 * kv * head_dim:
        raise LayoutError(f"query_key_value has {qkv_rows} rows; {heads} heads and {kv} kv heads "
                          f"of size {head_dim} make {hidden_size + 2 * kv * head_dim}")
    geometry = Heads(heads, kv, head_dim, grouped=kv != heads)
    rotary_pct = cfg.get("rotary_pct")
    if rotary_pct is None and rotary_dims is not None:
        rotary_pct = rotary_dims / head_dim
    elif rotary_pct is None:
        rotary_pct = _setting(cfg, "rotary_pct", assumed)
    elif rotary_dims is not None and rotary_dims // 2 != (int(head_dim * float(rotary_pct)) + 1) // 2:
        # RotaryEmbedding(dim=int(head_dim * rotary_pct)): inv_freq over arange(0, dim, 2)
        raise LayoutError(f"rotary-pct {rotary_pct} disagrees with the saved inv_freq "
                          f"({rotary_dims} of {head_dim} head dims rotate)")
    settings = {"norm": norm, "activation": activation, "pos_emb": pos_emb,
                "rotary_pct": float(rotary_pct),
                "rotary_emb_base": _setting(cfg, "rotary_emb_base", assumed)}
    if norm == "rmsnorm":
        if activation not in GATED_ACTIVATIONS:
            raise UnsupportedModelError(f"rmsnorm with activation {activation!r} cannot be "
                                        "exported (LlamaForCausalLM needs swiglu)")
        if gpt_j:
            raise UnsupportedModelError("gpt-j-residual with rmsnorm cannot be exported "
                                        "(LlamaForCausalLM has a sequential residual)")
        if float(rotary_pct) != 1.0:
            raise UnsupportedModelError(f"rotary-pct {rotary_pct} with rmsnorm cannot be "
                                        "exported (LlamaForCausalLM rotates whole heads)")
        if any(k.endswith("layernorm.offset") for k in block_keys):
            raise UnsupportedModelError("rmsnorm with a bias (offset) cannot be exported")
        settings["rms_norm_epsilon"] = _setting(cfg, "rms_norm_epsilon", assumed)
        window = cfg.get("sliding_window_width")
        settings["sliding_window"] = window
        architecture = "MistralForCausalLM" if window else "LlamaForCausalLM"
        return ModelSpec("llama", architecture, False, geometry, settings, found)
    if norm != "layernorm":
        raise UnsupportedModelError(f"norm {norm!r} cannot be exported (layernorm or rmsnorm)")
    if activation in GATED_ACTIVATIONS or activation in ("geglu", "reglu", "glu", "bilinear"):
        raise UnsupportedModelError(f"activation {activation!r} with layernorm cannot be "
                                    "exported (GPTNeoXForCausalLM has an ungated MLP)")
    if geometry.grouped:
        raise UnsupportedModelError(f"grouped-query attention ({kv} kv heads) with layernorm "
                                    "cannot be exported (GPTNeoXForCausalLM has none)")
    # transformers' GPTNeoX layers always carry these biases (use-bias-in-norms,
    # use-bias-in-attn-linear, use-bias-in-mlp false would leave them to random init).
    mlp_biases = {"mlp.dense_h_to_4h.bias", "mlp.linear1.bias", "mlp.fc1_bias"}
    for what, options in (("norm biases", {"input_layernorm.bias"}),
                          ("attention biases", {"attention.query_key_value.bias"}),
                          ("MLP biases", mlp_biases)):
        if not options & block_keys:
            raise UnsupportedModelError(f"a layernorm model without {what} cannot be exported "
                                        "as GPTNeoXForCausalLM")
    settings["layernorm_epsilon"] = _setting(cfg, "layernorm_epsilon", assumed)
    return ModelSpec("gpt_neox", "GPTNeoXForCausalLM", gpt_j, geometry, settings, found)


def llama_config(
    spec: ModelSpec,
    cfg: dict[str, Any],
    *,
    num_layers: int,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    attention_bias: bool,
    mlp_bias: bool,
    torch_dtype: str,
) -> dict[str, Any]:
    """A ``config.json`` for ``LlamaForCausalLM`` / ``MistralForCausalLM``. The sizes are the
    tensors' (GPT-NeoX's ``intermediate-size`` counts both halves of linear1 before rounding,
    ``ParallelMLP.__init__``; the exported MLP width is half of linear1's rows)."""
    assert spec.heads is not None
    s = spec.settings
    theta = float(s["rotary_emb_base"])
    seq = int(cfg.get("max_position_embeddings") or cfg.get("seq_length") or 2048)
    mistral = spec.architecture == "MistralForCausalLM"
    if mistral and (attention_bias or mlp_bias):
        raise UnsupportedModelError("biases with a sliding window cannot be exported "
                                    "(MistralForCausalLM has none)")
    config: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": spec.heads.heads,
        "num_key_value_heads": spec.heads.kv_heads,
        "head_dim": spec.heads.head_dim,
        "hidden_act": GATED_ACTIVATIONS[s["activation"]],
        "max_position_embeddings": seq,
        "rms_norm_eps": float(s["rms_norm_epsilon"]),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "initializer_range": float(cfg.get("init_method_std") or 0.02),
        "tie_word_embeddings": False,
        "use_cache": True,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if mistral:
        # GPT-NeoX hands flash-attn window_size=(width, -1) (ParallelSelfAttention.flash_attention):
        # a query sees itself and `width` keys before it. transformers' sliding_window counts the
        # query too (masking_utils.sliding_window_overlay: kv_idx > q_idx - sliding_window).
        config["sliding_window"] = int(s["sliding_window"]) + 1
    else:
        config.update(attention_bias=attention_bias, mlp_bias=mlp_bias, pretraining_tp=1)
    return config


def model_config(plan: ModelPlan, cfg: dict[str, Any], torch_dtype: str) -> dict[str, Any]:
    """The ``config.json`` of the exported model (transformers class per :attr:`ModelPlan.spec`)."""
    spec = plan.spec
    assert spec is not None
    sizes = {"num_layers": plan.num_layers, "vocab_size": plan.vocab_size,
             "hidden_size": plan.hidden_size, "intermediate_size": plan.intermediate_size,
             "torch_dtype": torch_dtype}
    names = {j.name for j in plan.jobs}
    if spec.family == "llama":
        return llama_config(spec, cfg, **sizes,
                            attention_bias="model.layers.0.self_attn.q_proj.bias" in names,
                            mlp_bias="model.layers.0.mlp.up_proj.bias" in names)
    settings = {**cfg, **spec.settings, "gpt_j_residual": spec.gpt_j_residual}
    return hf_config(settings, **sizes)


def model_notes(plan: ModelPlan) -> dict[str, Any]:
    """What state.json says about the model's reading: where its settings came from."""
    spec = plan.spec
    assert spec is not None
    return {"architecture": spec.architecture, "config_source": plan.config_source,
            "assumed_gpt_neox_defaults": spec.assumed,
            "row_parallel_biases": ("summed over tensor-parallel ranks (gpt-j-residual)"
                                    if spec.gpt_j_residual else
                                    "one rank's copy (every rank holds the same bias)")}
