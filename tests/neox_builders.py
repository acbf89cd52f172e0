"""Raw GPT-NeoX checkpoints built from a transformers model by the training code's own rules.

Nothing here uses the exporter: each rank's shard is cut the way GPT-NeoX lays it out, so an
export that merges them back can be compared with the unsharded model.

- ``megatron/mpu/layers.py``: ``VocabParallelEmbedding`` and ``ColumnParallelLinear`` (the
  final linear, QKV, linear1) give rank r the r-th block of output rows; ``RowParallelLinear``
  (attention.dense, linear2) the r-th block of input columns, and its bias is added after the
  all-reduce, so every rank holds the whole bias — except with ``gpt-j-residual``, where all
  ranks' outputs and biases are summed in one all-reduce (``ParallelTransformerLayer.forward``):
  there each rank holds the bias divided by the number of ranks, which sum back exactly.
- ``megatron/model/transformer.py``: multi-head QKV is read per rank as ``[heads, 3 * head_dim]``
  (``[q_h; k_h; v_h]`` per head); ``gqa_project`` reads each rank's rows as ``[q; k; v]``;
  ``Gated_Activation`` reads each rank's linear1 rows as ``[up; gate]``.
- ``megatron/model/norms.py``: RMSNorm's weight is ``scale``; norms are whole on every rank.
- ``megatron/checkpointing.py`` ``save_ds_checkpoint``: ``args`` in ``mp_rank_XX``.
- DeepSpeed ``stage_1_and_2.py`` ``state_dict`` (current format, one data-parallel rank):
  ``single_partition_of_fp32_groups``, a torch optimizer ``state_dict``, ``param_shapes`` in the
  mp_rank file, two GPT-NeoX param groups (weights / norms and biases).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

Shards = list[dict[str, torch.Tensor]]  # one {layer-file key: tensor} per tp rank


def rows(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [c.clone() for c in t.chunk(tp, dim=0)]


def cols(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [c.clone() for c in t.chunk(tp, dim=1)]


def whole(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [t.clone() for _ in range(tp)]


def row_bias(t: torch.Tensor, tp: int, gpt_j_residual: bool) -> list[torch.Tensor]:
    return [t / tp for _ in range(tp)] if gpt_j_residual else whole(t, tp)


def qkv_shards(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tp: int, heads: int,
               kv_heads: int) -> list[torch.Tensor]:
    """Each rank's query_key_value rows (weight or bias) as the training code reads them."""
    d = q.shape[0] // heads
    out = []
    for r in range(tp):
        hs = range(r * heads // tp, (r + 1) * heads // tp)
        if kv_heads == heads:  # [q_h; k_h; v_h] per head of the rank
            out.append(torch.cat([x[h * d:(h + 1) * d] for h in hs for x in (q, k, v)]))
        else:  # gqa_project: [q; k; v] blocks of the rank
            kvs = slice(r * kv_heads // tp * d, (r + 1) * kv_heads // tp * d)
            out.append(torch.cat([q[hs.start * d:hs.stop * d], k[kvs], v[kvs]]))
    return out


def llama_layers(sd: dict[str, torch.Tensor], *, layers: int, heads: int, kv_heads: int,
                 tp: int) -> dict[int, Shards]:
    """Pipeline layer -> per-rank layer-file dicts of a Llama-style GPT-NeoX model."""
    out: dict[int, Shards] = {0: _ranks({"word_embeddings.weight": rows(sd["model.embed_tokens.weight"], tp)})}
    for i in range(layers):
        p = f"model.layers.{i}."
        up, gate = rows(sd[p + "mlp.up_proj.weight"], tp), rows(sd[p + "mlp.gate_proj.weight"], tp)
        out[i + 2] = _ranks({
            "input_layernorm.scale": whole(sd[p + "input_layernorm.weight"], tp),
            "attention.query_key_value.weight": qkv_shards(
                sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"],
                sd[p + "self_attn.v_proj.weight"], tp, heads, kv_heads),
            "attention.dense.weight": cols(sd[p + "self_attn.o_proj.weight"], tp),
            "post_attention_layernorm.scale": whole(sd[p + "post_attention_layernorm.weight"], tp),
            "mlp.linear1.weight": [torch.cat([u, g]) for u, g in zip(up, gate, strict=True)],
            "mlp.linear2.weight": cols(sd[p + "mlp.down_proj.weight"], tp),
        })
    out[layers + 3] = _ranks({"norm.scale": whole(sd["model.norm.weight"], tp)})
    out[layers + 4] = _ranks({"final_linear.weight": rows(sd["lm_head.weight"], tp)})
    return out


MLP_NAMES = {  # GPT-NeoX MLP naming -> (linear1 w, linear1 b, linear2 w, linear2 b)
    "legacy": ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
               "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"),
    "linear": ("mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias"),
    "transformer_engine": ("mlp.fc1_weight", "mlp.fc1_bias", "mlp.fc2_weight", "mlp.fc2_bias"),
}


def gpt_neox_layers(sd: dict[str, torch.Tensor], *, layers: int, tp: int, gpt_j_residual: bool,
                    naming: str = "linear") -> dict[int, Shards]:
    """Pipeline layer -> per-rank layer-file dicts of a GPTNeoX-style model. transformers'
    GPTNeoX QKV is per-head [q_h; k_h; v_h] like GPT-NeoX's, so a rank's rows are a block."""
    w1, b1, w2, b2 = MLP_NAMES[naming]
    out: dict[int, Shards] = {0: _ranks({"word_embeddings.weight": rows(sd["gpt_neox.embed_in.weight"], tp)})}
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        block = {
            "input_layernorm.weight": whole(sd[p + "input_layernorm.weight"], tp),
            "input_layernorm.bias": whole(sd[p + "input_layernorm.bias"], tp),
            "attention.query_key_value.weight": rows(sd[p + "attention.query_key_value.weight"], tp),
            "attention.query_key_value.bias": rows(sd[p + "attention.query_key_value.bias"], tp),
            "attention.dense.weight": cols(sd[p + "attention.dense.weight"], tp),
            "attention.dense.bias": row_bias(sd[p + "attention.dense.bias"], tp, gpt_j_residual),
            w1: rows(sd[p + "mlp.dense_h_to_4h.weight"], tp),
            b1: rows(sd[p + "mlp.dense_h_to_4h.bias"], tp),
            w2: cols(sd[p + "mlp.dense_4h_to_h.weight"], tp),
            b2: row_bias(sd[p + "mlp.dense_4h_to_h.bias"], tp, gpt_j_residual),
        }
        norm = "post_attention_layernorm"
        if naming == "transformer_engine":  # TELayerNormMLP holds the post-attention norm
            block["mlp.layer_norm_weight"] = whole(sd[p + f"{norm}.weight"], tp)
            block["mlp.layer_norm_bias"] = whole(sd[p + f"{norm}.bias"], tp)
            block["mlp._extra_state"] = [torch.tensor([r, 7], dtype=torch.uint8) for r in range(tp)]
        else:
            block[f"{norm}.weight"] = whole(sd[p + f"{norm}.weight"], tp)
            block[f"{norm}.bias"] = whole(sd[p + f"{norm}.bias"], tp)
        out[i + 2] = _ranks(block)
    out[layers + 3] = _ranks({"norm.weight": whole(sd["gpt_neox.final_layer_norm.weight"], tp),
                              "norm.bias": whole(sd["gpt_neox.final_layer_norm.bias"], tp)})
    out[layers + 4] = _ranks({"final_linear.weight": rows(sd["lm_head.weight"], tp)})
    return out


def _ranks(per_key: dict[str, list[torch.Tensor]]) -> Shards:
    tp = len(next(iter(per_key.values())))
    return [{k: v[r] for k, v in per_key.items()} for r in range(tp)]


def is_no_decay(key: str) -> bool:
    """GPT-NeoX ``get_params_for_weight_decay_optimization``: norms and biases."""
    return "norm" in key or key.endswith("bias") or key.endswith("_bias")


def write_checkpoint(folder: Path, layers: dict[int, Shards], *, args: dict[str, Any],
                     yaml_config: dict[str, Any] | None,
                     moments: dict[str, dict[int, Shards]] | None = None,
                     iteration: int = 7, lr: float = 2.5e-4) -> Path:
    """Write layer files, mp_rank files and (with ``moments``: kind -> layers-like shards of
    exp_avg / exp_avg_sq) current-format ZeRO-1 files for one data-parallel rank."""
    folder.mkdir(parents=True, exist_ok=True)
    tp = len(layers[0])
    for layer, shards in layers.items():
        for r, entries in enumerate(shards):
            torch.save(OrderedDict(entries), folder / f"layer_{layer:02d}-model_{r:02d}-model_states.pt")
    for r in range(tp):
        groups: list[OrderedDict[str, torch.Size]] = [OrderedDict(), OrderedDict()]
        flats: dict[str, list[list[torch.Tensor]]] = {k: [[], []] for k in ("master", "exp_avg", "exp_avg_sq")}
        for layer in sorted(layers):
            for key, tensor in layers[layer][r].items():
                if key.endswith("_extra_state"):
                    continue
                g = 1 if is_no_decay(key) else 0
                groups[g][f"{layer}.{key}"] = tensor.shape
                flats["master"][g].append(tensor.float().reshape(-1))
                if moments is not None:
                    for kind in ("exp_avg", "exp_avg_sq"):
                        flats[kind][g].append(moments[kind][layer][r][key].float().reshape(-1))
        state = {
            "module": None, "optimizer": None, "param_shapes": groups,
            "lr_scheduler": {"start_lr": 3e-4, "warmup_iter": 2, "num_iters": iteration,
                             "decay_style": "cosine", "end_iter": 100, "min_lr": 3e-5},
            "skipped_steps": 0, "global_steps": iteration, "global_samples": 8 * iteration,
            "dp_world_size": 1, "mp_world_size": tp, "iteration": iteration, "args": args,
        }
        torch.save(state, folder / f"mp_rank_{r:02d}_model_states.pt")
        if moments is None:
            continue
        flat = {k: [torch.cat(v[g]) for g in range(2)] for k, v in flats.items()}
        osd = {
            "single_partition_of_fp32_groups": flat["master"],
            "base_optimizer_state": {
                "state": {g: {"step": torch.tensor(float(iteration)), "exp_avg": flat["exp_avg"][g],
                              "exp_avg_sq": flat["exp_avg_sq"][g]} for g in range(2)},
                "param_groups": [{"lr": lr, "betas": (0.9, 0.95), "params": [g]} for g in range(2)],
            },
            "group_paddings": [0, 0], "partition_count": [1, 1], "zero_stage": 1,
        }
        torch.save({"optimizer_state_dict": osd}, folder / f"zero_pp_rank_0_mp_rank_{r:02d}_optim_states.pt")
    if yaml_config is not None:
        (folder / "neox.yml").write_text(json.dumps(yaml_config, indent=1) + "\n")
    return folder
