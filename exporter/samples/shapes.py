"""Model shapes and the parameter list of a Pythia-era GPT-NeoX pipeline model.

Names, order and tensor-parallel shapes follow GPT-NeoX (Oct 2022, the Pythia era):
``megatron/model/gpt2_model.py`` ``GPT2ModelPipe.init_specs`` (pipeline layer indices),
``megatron/model/transformer.py`` (``ParallelTransformerLayer``, ``ParallelSelfAttention``,
``ParallelMLP``, ``ParallelLinear``, ``NormPipe``: registration order, hence state-dict and
``named_parameters`` order) and ``megatron/mpu/layers.py`` (column-parallel layers split their
output dim, row-parallel layers their input dim and keep a full bias per rank).
DeepSpeed's ``PipelineModule._build`` (DeeperSpeed eb7f5cff ``deepspeed/runtime/pipe/module.py``)
registers each layer as ``str(layer_idx)``, so module names read ``2.attention.dense.weight``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from exporter.errors import ExporterError


class SampleSpecError(ExporterError):
    """The requested sample checkpoint cannot exist (inconsistent shape or partitioning)."""


class Parallel(enum.Enum):
    """How a parameter is laid out over tensor-parallel ranks."""

    COLUMN = "column"  # output dim split (dim 0): qkv, dense_h_to_4h, final_linear, embedding
    ROW = "row"  # input dim split (dim 1): attention.dense, dense_4h_to_h weights
    ROW_BIAS = "row_bias"  # full bias on every rank, added before the gpt_j_residual all-reduce
    REPLICATED = "replicated"  # layer norms: identical on every rank


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a GPT-NeoX model (``vocab_size`` is the padded vocabulary)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    seq_length: int
    rotary_pct: float = 0.25
    name: str = "custom"

    def __post_init__(self) -> None:
        for field_name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "seq_length"):
            if getattr(self, field_name) < 1:
                raise SampleSpecError(f"ModelShape.{field_name} must be positive")
        if self.hidden_size % self.num_heads:
            raise SampleSpecError("ModelShape.hidden_size must be a multiple of num_heads")
        if self.rotary_ndims < 2 or self.rotary_ndims % 2:
            raise SampleSpecError("ModelShape.rotary_pct must give an even rotary dim >= 2")

    @property
    def intermediate(self) -> int:
        """MLP width: GPT-NeoX ``ParallelMLP`` uses 4 * hidden."""
        return 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        """``int(head_dim * rotary_pct)``, as ``ParallelSelfAttention.__init__`` computes it."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def final_norm_layer(self) -> int:
        return self.num_layers + 3

    @property
    def output_layer(self) -> int:
        return self.num_layers + 4

    def layer_indices(self) -> list[int]:
        """Pipeline layer indices that have a layer file (1 and N+2 are functions)."""
        return [0, *range(2, self.num_layers + 2), self.final_norm_layer, self.output_layer]

    def num_parameters(self) -> int:
        """Parameter count of the whole (unsharded) model."""
        return sum(spec.numel for spec in parameter_specs(self, tp=1, tp_rank=0))


TINY = ModelShape(
    num_layers=2, hidden_size=32, num_heads=4, vocab_size=128, seq_length=16, name="tiny"
)
PYTHIA_160M = ModelShape(
    num_layers=12, hidden_size=768, num_heads=12, vocab_size=50304, seq_length=2048, name="160M"
)
PYTHIA_410M = ModelShape(
    num_layers=24, hidden_size=1024, num_heads=16, vocab_size=50304, seq_length=2048, name="410M"
)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of one tensor-parallel rank, as the pipeline module names it."""

    layer: int
    key: str  # name inside the layer file, e.g. ``attention.dense.weight``
    shape: tuple[int, ...]  # local (per tp rank) shape
    parallel: Parallel
    weight_decay: bool  # group 0 (decay) or group 1 (norms and biases)

    @property
    def name(self) -> str:
        """Module name as in ``param_shapes``: ``{layer}.{key}``."""
        return f"{self.layer}.{self.key}"

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def group(self) -> int:
        """Param group: 0 decay, 1 no decay (``get_params_for_weight_decay_optimization``)."""
        return 0 if self.weight_decay else 1


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise SampleSpecError(f"{what} ({size}) is not divisible by tensor-parallel size {tp}")
    return size // tp


def parameter_specs(shape: ModelShape, tp: int, tp_rank: int) -> list[ParamSpec]:
    """All parameters of one tp rank in ``named_parameters()`` order.

    That order is also the order inside each optimizer group: GPT-NeoX
    ``get_params_for_weight_decay_optimization`` walks ``module.modules()`` (the same DFS) and
    puts layer-norm parameters and every ``bias`` in the no-decay group, the rest in the decay
    group. ``tp_rank`` only selects the shard; all ranks have the same shapes.
    """
    if not 0 <= tp_rank < tp:
        raise SampleSpecError(f"tp_rank {tp_rank} outside tensor-parallel size {tp}")
    h, f = shape.hidden_size, shape.intermediate
    qkv = _split(3 * h, tp, "3 * hidden_size")
    h_tp = _split(h, tp, "hidden_size")
    f_tp = _split(f, tp, "intermediate size")
    vocab = _split(shape.vocab_size, tp, "vocab_size")
    _split(shape.num_heads, tp, "num_heads")
    rep, col, row, rbias = Parallel.REPLICATED, Parallel.COLUMN, Parallel.ROW, Parallel.ROW_BIAS
    block: list[tuple[str, tuple[int, ...], Parallel, bool]] = [
        ("input_layernorm.weight", (h,), rep, False),
        ("input_layernorm.bias", (h,), rep, False),
        ("attention.query_key_value.weight", (qkv, h), col, True),
        ("attention.query_key_value.bias", (qkv,), col, False),
        ("attention.dense.weight", (h, h_tp), row, True),
        ("attention.dense.bias", (h,), rbias, False),
        ("post_attention_layernorm.weight", (h,), rep, False),
        ("post_attention_layernorm.bias", (h,), rep, False),
        ("mlp.dense_h_to_4h.weight", (f_tp, h), col, True),
        ("mlp.dense_h_to_4h.bias", (f_tp,), col, False),
        ("mlp.dense_4h_to_h.weight", (h, f_tp), row, True),
        ("mlp.dense_4h_to_h.bias", (h,), rbias, False),
    ]
    specs = [ParamSpec(0, "word_embeddings.weight", (vocab, h), col, True)]
    for layer in range(2, shape.num_layers + 2):
        specs += [ParamSpec(layer, key, dims, par, wd) for key, dims, par, wd in block]
    specs += [
        ParamSpec(shape.final_norm_layer, "norm.weight", (h,), rep, False),
        ParamSpec(shape.final_norm_layer, "norm.bias", (h,), rep, False),
        ParamSpec(shape.output_layer, "final_linear.weight", (vocab, h), col, True),
    ]
    return specs


ROTARY_BUFFER = "attention.rotary_emb.inv_freq"
# The persistent buffer sits between qkv and dense in a block's state dict: RotaryEmbedding is
# registered after query_key_value in ParallelSelfAttention.__init__.
ROTARY_BUFFER_AFTER = "attention.query_key_value.bias"
