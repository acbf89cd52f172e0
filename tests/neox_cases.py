"""The model variants the architecture tests cut into GPT-NeoX checkpoints: a small random
transformers model per case, and the GPT-NeoX settings it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers

LAYERS, HIDDEN, HEADS, VOCAB = 2, 32, 4, 64


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # which transformers class and builder
    kv_heads: int = HEADS
    gpt_j_residual: bool = False
    naming: str = "linear"
    sliding_window: int | None = None


CASES = [
    Case("gpt_neox_legacy_names", "gpt_neox", naming="legacy"),
    Case("gpt_neox_linear_names", "gpt_neox"),
    Case("gpt_neox_linear_names_gpt_j", "gpt_neox", gpt_j_residual=True),
    Case("gpt_neox_transformer_engine_names", "gpt_neox", gpt_j_residual=True,
         naming="transformer_engine"),
    Case("llama_multi_head", "llama"),
    Case("llama_grouped_query", "llama", kv_heads=2),
    Case("mistral_grouped_query", "mistral", kv_heads=2, sliding_window=16),
]


def hf_model(case: Case, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    if case.family == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=64,
            use_parallel_residual=case.gpt_j_residual, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25})
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        cls = transformers.MistralConfig if case.family == "mistral" else transformers.LlamaConfig
        config = cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=case.kv_heads,
                     intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, sliding_window=case.sliding_window)
        model = (transformers.MistralForCausalLM if case.family == "mistral"
                 else transformers.LlamaForCausalLM)(config)
    with torch.no_grad():  # norms and biases away from ones and zeros, so merges show
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.float().eval()


def neox_yaml(case: Case) -> dict[str, Any]:
    common = {"num-layers": LAYERS, "hidden-size": HIDDEN, "num-attention-heads": HEADS,
              "max-position-embeddings": 64, "pos-emb": "rotary", "rotary-emb-base": 10000,
              "gpt-j-residual": case.gpt_j_residual}
    if case.family == "gpt_neox":
        return {**common, "norm": "layernorm", "layernorm-epsilon": 1e-5, "activation": "gelu",
                "rotary-pct": 0.25}
    extra = {"num-kv-heads": case.kv_heads} if case.kv_heads != HEADS else {}
    if case.sliding_window:
        # flash-attn window_size=(width, -1): the query and `width` keys before it, one fewer
        # than transformers' sliding_window, which counts the query
        extra["sliding-window-width"] = case.sliding_window - 1
    return {**common, **extra, "norm": "rmsnorm", "rms-norm-epsilon": 1e-6, "activation": "swiglu",
            "rotary-pct": 1.0, "use-bias-in-norms": False, "use-bias-in-attn-linear": False,
            "use-bias-in-mlp": False}
