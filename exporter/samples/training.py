"""A few real mixed-precision training steps of a small GPT-NeoX, the way a Pythia run takes them.

The model is GPT-NeoX with ``gpt_j_residual`` (parallel attention and MLP), rotary embeddings on
``rotary_pct`` of each head, a final norm and an untied output layer (GPT-NeoX
``megatron/model/transformer.py``; the same function as transformers' ``GPTNeoXForCausalLM``
with exact GELU). Parameters are kept as tensor-parallel shards: column-parallel shards
concatenate on dim 0, row-parallel weights on dim 1, row-parallel biases are summed (each rank
adds its own before the all-reduce) and norms are one tensor shared by every rank.

One step follows DeeperSpeed eb7f5cff ``stage1.py`` ``FP16_DeepSpeedZeroOptimizer_Stage1.step``
and ``engine.py`` ``_take_model_step``: gradients of the scaled loss in the model dtype, the
overflow check, ``update_scale`` *before* unscaling (so the unscale and the clip use the updated
scale, as the source does), an AdamW step on the fp32 masters with decoupled weight decay
(FusedAdam's ``adam_w_mode``), the scheduler step unless the step overflowed, and the model
weights recast from the masters. Before the first step, stage 1's ``_initialize_optimizer_states``
takes one Adam step with zero gradients at the set-up learning rate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from exporter.samples.shapes import ModelShape, Parallel, ParamSpec, parameter_specs
from exporter.samples.state import EngineState, RunConfig
from exporter.samples.synthetic import init_std

Key = tuple[int, str]  # (owning tp rank, module name)


def owner(tp_rank: int, spec: ParamSpec) -> Key:
    """Norms are one tensor for all ranks; every other parameter is per rank."""
    return (0 if spec.parallel is Parallel.REPLICATED else tp_rank, spec.name)


class MemorySource:
    """A snapshot of trained tensors: ``kind -> (owner key) -> flat fp32``."""

    def __init__(self, tensors: dict[str, dict[Key, torch.Tensor]]) -> None:
        self.tensors = tensors

    def fill(self, kind: str, tp_rank: int, spec: ParamSpec, start: int, out: torch.Tensor) -> None:
        out.copy_(self.tensors[kind][owner(tp_rank, spec)][start : start + out.numel()])


def _initial_masters(
    shape: ModelShape, tp: int, dtype: torch.dtype, seed: int
) -> dict[Key, torch.Tensor]:
    """GPT-NeoX initialisation, rounded through the model dtype: stage 1 builds the fp32
    masters by cloning the half-precision model."""
    masters: dict[Key, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed)
    for tp_rank in range(tp):
        for spec in parameter_specs(shape, tp, tp_rank):
            key = owner(tp_rank, spec)
            if key in masters:
                continue
            if spec.key.endswith("norm.weight"):
                value = torch.ones(spec.shape)
            elif spec.key.endswith("bias"):
                value = torch.zeros(spec.shape)
            else:
                value = torch.randn(spec.shape, generator=generator) * init_std(spec, shape)
            masters[key] = value.to(dtype).float()
    return masters


@functools.cache
def _specs_by_name(shape: ModelShape, tp: int) -> dict[str, list[ParamSpec]]:
    """Module name -> its spec on each tp rank."""
    result: dict[str, list[ParamSpec]] = {}
    for tp_rank in range(tp):
        for spec in parameter_specs(shape, tp, tp_rank):
            result.setdefault(spec.name, []).append(spec)
    return result


def _full(
    weights: dict[Key, torch.Tensor], shape: ModelShape, tp: int, layer: int, key: str
) -> torch.Tensor:
    """The unsharded tensor, assembled the way the tensor-parallel forward combines shards."""
    specs = _specs_by_name(shape, tp)[f"{layer}.{key}"]
    shards = [weights[owner(r, spec)] for r, spec in enumerate(specs)]
    parallel = specs[0].parallel
    if parallel is Parallel.COLUMN:
        return torch.cat(shards, dim=0)
    if parallel is Parallel.ROW:
        return torch.cat(shards, dim=1)
    if parallel is Parallel.ROW_BIAS:
        return torch.stack(shards).sum(dim=0)
    return shards[0]


def _rotate(x: torch.Tensor, shape: ModelShape, positions: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary embedding on the first ``rotary_ndims`` channels (``rotate_half``)."""
    dim = shape.rotary_ndims
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * emb.cos() + rotated * emb.sin(), rest), dim=-1)


def neox_loss(
    weights: dict[Key, torch.Tensor], shape: ModelShape, tp: int, tokens: torch.Tensor
) -> torch.Tensor:
    """Next-token cross entropy of the GPT-NeoX forward on ``tokens`` (batch, seq)."""

    def w(layer: int, key: str) -> torch.Tensor:
        return _full(weights, shape, tp, layer, key)

    batch, seq = tokens.shape
    heads, head_dim, hidden = shape.num_heads, shape.head_dim, shape.hidden_size
    positions = torch.arange(seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    x = F.embedding(tokens, w(0, "word_embeddings.weight"))
    for layer in range(2, shape.num_layers + 2):
        h = F.layer_norm(
            x, (hidden,), w(layer, "input_layernorm.weight"), w(layer, "input_layernorm.bias"), 1e-5
        )
        qkv = F.linear(
            h,
            w(layer, "attention.query_key_value.weight"),
            w(layer, "attention.query_key_value.bias"),
        )
        q, k, v = qkv.view(batch, seq, heads, 3 * head_dim).transpose(1, 2).split(head_dim, dim=-1)
        q, k = _rotate(q, shape, positions), _rotate(k, shape, positions)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, seq, hidden)
        attn = F.linear(attn, w(layer, "attention.dense.weight"), w(layer, "attention.dense.bias"))
        m = F.layer_norm(
            x,
            (hidden,),
            w(layer, "post_attention_layernorm.weight"),
            w(layer, "post_attention_layernorm.bias"),
            1e-5,
        )
        m = F.gelu(
            F.linear(m, w(layer, "mlp.dense_h_to_4h.weight"), w(layer, "mlp.dense_h_to_4h.bias"))
        )
        m = F.linear(m, w(layer, "mlp.dense_4h_to_h.weight"), w(layer, "mlp.dense_4h_to_h.bias"))
        x = x + attn + m
    final = shape.final_norm_layer
    x = F.layer_norm(x, (hidden,), w(final, "norm.weight"), w(final, "norm.bias"), 1e-5)
    logits = F.linear(x, w(shape.output_layer, "final_linear.weight"))
    return F.cross_entropy(logits[:, :-1].reshape(-1, shape.vocab_size), tokens[:, 1:].reshape(-1))


def sample_tokens(shape: ModelShape, batch: int, seed: int, step: int) -> torch.Tensor:
    """A learnable toy language: each token is an affine function of the previous one."""
    generator = torch.Generator().manual_seed(seed * 7919 + step)
    tokens = torch.empty(batch, shape.seq_length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, shape.vocab_size, (batch,), generator=generator)
    for t in range(1, shape.seq_length):
        tokens[:, t] = (5 * tokens[:, t - 1] + 3) % shape.vocab_size
    return tokens


class FusedAdamW:
    """Adam with decoupled weight decay as FusedAdam's ``adam_w_mode`` kernel computes it
    (DeeperSpeed ``csrc/adam/multi_tensor_adam.cu``): one step counter per optimizer, bias
    corrections on both moments, ``p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``."""

    def __init__(
        self, groups: list[list[torch.Tensor]], weight_decays: list[float], config: RunConfig
    ) -> None:
        self.groups = list(zip(groups, weight_decays, strict=True))
        self.beta1, self.beta2 = config.betas
        self.eps = config.eps
        self.step_count = 0
        params = [p for group in groups for p in group]
        self.exp_avg = {id(p): torch.zeros_like(p) for p in params}
        self.exp_avg_sq = {id(p): torch.zeros_like(p) for p in params}

    def step(self, grads: dict[int, torch.Tensor], lr: float) -> None:
        self.step_count += 1
        correction1 = 1 - self.beta1**self.step_count
        correction2 = 1 - self.beta2**self.step_count
        for params, weight_decay in self.groups:
            for p in params:
                grad, m, v = grads[id(p)], self.exp_avg[id(p)], self.exp_avg_sq[id(p)]
                m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
                v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
                update = (m / correction1) / (
                    (v / correction2).sqrt() + self.eps
                ) + weight_decay * p
                p.sub_(lr * update)


Snapshot = Callable[[int, EngineState, MemorySource, int], None]


def train(
    shape: ModelShape,
    *,
    tp: int,
    dp: int,
    dtype: torch.dtype,
    seed: int,
    config: RunConfig,
    snapshot_steps: list[int],
    snapshot: Snapshot,
) -> None:
    """Train from initialisation, calling ``snapshot(step, engine, source, adam_step)`` after
    each listed global step (0 = after set-up, before any update)."""
    masters = _initial_masters(shape, tp, dtype, seed)
    groups: list[list[torch.Tensor]] = [[], []]
    norm_keys: list[Key] = []
    for tp_rank in range(tp):
        for spec in parameter_specs(shape, tp, tp_rank):
            key = owner(tp_rank, spec)
            if key[0] == tp_rank:
                groups[spec.group].append(masters[key])
            # Megatron's grad norm counts tp-replicated values once (tp rank 0).
            if tp_rank == 0 or spec.parallel in (Parallel.COLUMN, Parallel.ROW):
                norm_keys.append(key)
    optimizer = FusedAdamW(groups, [config.weight_decay, 0.0], config)
    # Stage 1's set-up step: zero gradients at the scheduler's initial lr.
    optimizer.step({id(m): torch.zeros_like(m) for m in masters.values()}, config.lr_at(0))
    engine = EngineState(loss_scaler=config.new_loss_scaler(dtype))

    def emit(step: int) -> None:
        tensors = {
            "master": {k: m.flatten().clone() for k, m in masters.items()},
            "exp_avg": {k: optimizer.exp_avg[id(m)].flatten().clone() for k, m in masters.items()},
            "exp_avg_sq": {
                k: optimizer.exp_avg_sq[id(m)].flatten().clone() for k, m in masters.items()
            },
        }
        snapshot(step, engine, MemorySource(tensors), optimizer.step_count)

    pending = sorted(set(snapshot_steps))
    if pending and pending[0] == 0:
        emit(pending.pop(0))
    batch = config.micro_batch_size * config.gradient_accumulation_steps * dp
    for step in range(1, (pending[-1] if pending else 0) + 1):
        weights = {k: m.to(dtype).float().requires_grad_() for k, m in masters.items()}
        tokens = sample_tokens(shape, batch, seed, step)
        (neox_loss(weights, shape, tp, tokens) * engine.loss_scaler.cur_scale).backward()
        grads = {k: weights[k].grad.to(dtype) for k in masters}  # type: ignore[union-attr]
        overflow = not all(bool(torch.isfinite(g).all()) for g in grads.values())
        engine.record_step(overflow)
        if not overflow:
            scale = engine.loss_scaler.cur_scale
            norm = math.sqrt(sum(float(grads[k].float().square().sum()) for k in norm_keys))
            clip = (norm / scale + 1e-6) / config.gradient_clipping
            combined = clip * scale if config.gradient_clipping > 0 and clip > 1 else scale
            unscaled = {id(m): grads[k].float() / combined for k, m in masters.items()}
            optimizer.step(unscaled, config.lr_at(engine.scheduler_steps - 1))
        if pending and step == pending[0]:
            emit(pending.pop(0))
