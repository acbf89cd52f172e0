"""The GPT-NeoX YAML config, and the transformers ``GPTNeoXConfig`` built from it.

GPT-NeoX accepts both ``hidden-size`` and ``hidden_size`` spellings
(``megatron/neox_arguments``); we normalise to underscores. The Hugging Face fields follow
GPT-NeoX ``tools/ckpts/convert_neox_to_hf.py`` ``create_config``, with sizes taken from the
tensors themselves where they are authoritative (vocabulary after padding, MLP width).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from exporter.errors import LayoutError

if TYPE_CHECKING:
    from exporter.neox.checkpoint import CheckpointFiles


def load_neox_config(paths: list[Path]) -> dict[str, Any]:
    """Merge the YAML files of a checkpoint (GPT-NeoX merges several config files the same way)."""
    merged: dict[str, Any] = {}
    for path in sorted(paths):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise LayoutError(f"{path}: not a readable YAML config: {exc}") from exc
        if data is None:
            continue
        if not isinstance(data, dict):
            raise LayoutError(f"{path}: YAML config is not a mapping")
        merged.update({str(k).replace("-", "_"): v for k, v in data.items()})
    return merged


def checkpoint_args(files: CheckpointFiles) -> dict[str, Any]:
    """The model settings ``mp_rank_00_model_states.pt`` records: its ``args`` (GPT-NeoX
    ``megatron/checkpointing.py`` ``save_ds_checkpoint``: num_layers, hidden_size,
    num_attention_heads, max_position_embeddings, make_vocab_size_divisible_by,
    padded_vocab_size, tokenizer_type, model_parallel_size) and a ``neox_args`` dict where a
    training code saved one; keys normalised to underscores."""
    from exporter.torchfile import load_torch_file

    path = files.mp_files.get(0)
    root = load_torch_file(path).obj if path is not None else None
    out: dict[str, Any] = {}
    for key in ("neox_args", "args"):
        value = root.get(key) if isinstance(root, dict) else None
        if isinstance(value, dict):
            out.update({str(k).replace("-", "_"): v for k, v in value.items()
                        if isinstance(v, (str, int, float, bool, list)) or v is None})
    return out


def read_neox_config(files: CheckpointFiles) -> dict[str, Any]:
    """The GPT-NeoX settings of a checkpoint: its YAML config(s), completed by the values the
    engine state records; a value both give must agree.

    Raises:
        LayoutError: the YAML and the checkpoint's args disagree (the message names both).
    """
    cfg = load_neox_config(files.configs)
    recorded = checkpoint_args(files)
    for key, value in recorded.items():
        mine = cfg.get(key)
        if mine is None or value is None:
            continue
        if mine != value and not _same_number(mine, value):
            raise LayoutError(
                f"{files.folder}: the YAML config says {key.replace('_', '-')}: {mine!r}, "
                f"{files.mp_files[0].name} args say {value!r}"
            )
    return {**{k: v for k, v in recorded.items() if v is not None},
            **{k: v for k, v in cfg.items() if v is not None or k not in recorded}}


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and float(a) == float(b))


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def hf_config(
    cfg: dict[str, Any],
    *,
    num_layers: int,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    torch_dtype: str,
) -> dict[str, Any]:
    """A ``config.json`` for ``transformers.GPTNeoXForCausalLM``.

    Raises:
        LayoutError: the config lacks the number of attention heads.
    """
    heads = _get(cfg, "num_attention_heads")
    if heads is None:
        raise LayoutError("the GPT-NeoX config has no num-attention-heads; cannot describe the model")
    if _get(cfg, "gpt_j_tied", False):
        raise LayoutError("gpt-j-tied layer norms have no GPTNeoXForCausalLM equivalent")
    pos_emb = _get(cfg, "pos_emb", "rotary")
    if pos_emb != "rotary":
        raise LayoutError(f"pos-emb {pos_emb!r} has no GPTNeoXForCausalLM equivalent (rotary only)")
    activation = _get(cfg, "activation", "gelu")
    rotary_pct = float(_get(cfg, "rotary_pct", 1.0))
    rotary_base = float(_get(cfg, "rotary_emb_base", 10000))
    seq = int(_get(cfg, "max_position_embeddings", _get(cfg, "seq_length", 2048)))
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": int(heads),
        "intermediate_size": intermediate_size,
        "hidden_act": activation,
        "max_position_embeddings": seq,
        "rotary_pct": rotary_pct,
        "rotary_emb_base": rotary_base,
        "partial_rotary_factor": rotary_pct,
        "rope_theta": rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": rotary_base,
                            "partial_rotary_factor": rotary_pct},
        "use_parallel_residual": bool(_get(cfg, "gpt_j_residual", False)),
        "layer_norm_eps": float(_get(cfg, "layernorm_epsilon", 1e-5)),
        "initializer_range": float(_get(cfg, "init_method_std", 0.02)),
        "tie_word_embeddings": False,
        "use_cache": True,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
