"""Engine and client state of a Pythia-era checkpoint: mp_rank file contents and the config.

Sources:
- DeeperSpeed eb7f5cff ``deepspeed/runtime/engine.py`` ``_save_checkpoint`` (engine keys) and
  ``_take_model_step`` (``skipped_steps`` grows on overflow, otherwise the lr scheduler steps;
  ``global_steps`` and ``global_samples`` grow every step).
- GPT-NeoX (Oct 2022) ``megatron/checkpointing.py`` ``save_ds_checkpoint`` (client state: the
  ``args`` dict, rng states), ``megatron/learning_rates.py`` ``AnnealingLR`` (schedule and
  ``state_dict``), ``megatron/training.py`` ``get_learning_rate_scheduler``.
- Pythia configs: GPT-NeoX ``configs/pythia/410M.yml`` and ``1B.yml`` (bf16 via ``fp16.type``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from exporter.samples.pickling import DynamicLossScaler, LossScaler
from exporter.samples.shapes import ModelShape
from exporter.samples.zero import PYTHIA_MAX_ELEMENTS_PER_COMM

# A synthetic run's gradients overflow fp16 once the loss scale reaches this value, which keeps
# the dynamic scale bouncing below it as real fp16 runs do (two skipped steps per window).
SYNTHETIC_OVERFLOW_SCALE = 2.0**17


@dataclass(frozen=True)
class RunConfig:
    """Training hyper-parameters written to the config and used by the samples' training."""

    lr: float = 0.0003
    min_lr: float = 0.00003
    warmup: float = 0.01
    train_iters: int = 143000
    decay_style: str = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    gradient_clipping: float = 1.0
    initial_scale_power: int = 12
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: int = 1
    micro_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_elements_per_comm: int = PYTHIA_MAX_ELEMENTS_PER_COMM
    make_vocab_size_divisible_by: int = 128

    @property
    def warmup_iter(self) -> float:
        """``warmup * lr_decay_iters`` as ``get_learning_rate_scheduler`` computes it."""
        return self.warmup * max(1, self.train_iters)

    def lr_at(self, num_iters: int) -> float:
        """``AnnealingLR.get_lr`` after ``num_iters`` scheduler steps."""
        end_iter = max(1, self.train_iters)
        warmup_iter = self.warmup_iter
        clipped = min(num_iters, end_iter - warmup_iter)
        if warmup_iter > 0 and num_iters <= warmup_iter:
            return float(self.lr) * clipped / warmup_iter
        clipped -= warmup_iter
        if self.decay_style == "cosine":
            lr = self.lr / 2.0 * (math.cos(math.pi * clipped / end_iter) + 1)
        elif self.decay_style == "linear":
            lr = self.lr * (end_iter - clipped) / end_iter
        else:
            lr = self.lr
        return max(lr, self.min_lr)

    def lr_scheduler_state(self, num_iters: int) -> dict[str, Any]:
        """``AnnealingLR.state_dict()``: the learning rate itself is not stored."""
        return {
            "start_lr": self.lr,
            "warmup_iter": self.warmup_iter,
            "num_iters": num_iters,
            "decay_style": self.decay_style,
            "end_iter": max(1, self.train_iters),
            "min_lr": self.min_lr,
        }

    def new_loss_scaler(self, dtype: torch.dtype) -> LossScaler | DynamicLossScaler:
        """fp16: dynamic scaling (``loss_scale: 0``); bf16: a static scale of 1.0."""
        if dtype == torch.bfloat16:
            return LossScaler(scale=1.0)
        return DynamicLossScaler(
            init_scale=2**self.initial_scale_power,
            scale_window=self.loss_scale_window,
            min_scale=self.min_loss_scale,
            delayed_shift=self.hysteresis,
        )


@dataclass
class EngineState:
    """What the engine knows at a checkpoint, besides tensors."""

    global_steps: int = 0
    skipped_steps: int = 0
    overflow: bool = False
    loss_scaler: LossScaler | DynamicLossScaler = field(default_factory=LossScaler)

    @property
    def scheduler_steps(self) -> int:
        """``AnnealingLR.num_iters``: the scheduler steps only on non-overflow steps."""
        return self.global_steps - self.skipped_steps

    @property
    def adam_step(self) -> int:
        """Adam's step count: one zero-gradient step at set-up (stage 1
        ``_initialize_optimizer_states``) plus one per non-skipped training step."""
        return 1 + self.global_steps - self.skipped_steps

    def record_step(self, overflow: bool) -> None:
        """One ``_take_model_step``: the scaler sees every step, the counters follow."""
        self.loss_scaler.update_scale(overflow)
        self.overflow = overflow
        self.skipped_steps += int(overflow)
        self.global_steps += 1


def simulated_engine(config: RunConfig, dtype: torch.dtype, steps: int) -> EngineState:
    """Engine state after ``steps`` synthetic steps: fp16 overflows whenever the loss scale
    reaches ``SYNTHETIC_OVERFLOW_SCALE``."""
    state = EngineState(loss_scaler=config.new_loss_scaler(dtype))
    dynamic = isinstance(state.loss_scaler, DynamicLossScaler)
    for _ in range(steps):
        state.record_step(dynamic and state.loss_scaler.cur_scale >= SYNTHETIC_OVERFLOW_SCALE)
    return state


def _rng_states(seed: int) -> dict[str, Any]:
    """Client rng states in the types ``save_ds_checkpoint`` stores."""
    cpu = torch.Generator().manual_seed(seed)
    # torch.cuda.get_rng_state() of a Philox generator: 8-byte seed + 8-byte offset.
    cuda = torch.tensor(list(seed.to_bytes(8, "little") + bytes(8)), dtype=torch.uint8)
    return {
        "random_rng_state": random.Random(seed).getstate(),
        "np_rng_state": np.random.RandomState(seed % 2**32).get_state(),
        "torch_rng_state": cpu.get_state(),
        "cuda_rng_state": cuda,
        "rng_tracker_states": {"model-parallel-rng": cuda.clone()},
    }


def mp_rank_state(
    shape: ModelShape,
    config: RunConfig,
    engine: EngineState,
    *,
    iteration: int,
    dp: int,
    tp: int,
    tp_rank: int,
    seed: int,
) -> dict[str, Any]:
    """Contents of ``mp_rank_{tp_rank:02d}_model_states.pt``, keys in the order saved.

    ``module`` is None because the pipeline engine saves weights in layer files
    (``PipelineEngine.module_state_dict``); ``optimizer`` is None under ZeRO.
    """
    state: dict[str, Any] = {
        "module": None,
        "optimizer": None,
        "lr_scheduler": config.lr_scheduler_state(engine.scheduler_steps),
        "csr_tensor_module_names": set(),
        "skipped_steps": engine.skipped_steps,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_steps * train_batch_size(config, dp),
        "dp_world_size": dp,
        "mp_world_size": tp,
        "iteration": iteration,
        "args": {
            "num_layers": shape.num_layers,
            "hidden_size": shape.hidden_size,
            "num_attention_heads": shape.num_heads,
            "max_position_embeddings": shape.seq_length,
            "make_vocab_size_divisible_by": config.make_vocab_size_divisible_by,
            "padded_vocab_size": shape.vocab_size,
            "tokenizer_type": "HFTokenizer",
            "model_parallel_size": tp,
        },
    }
    state.update(_rng_states(seed * 1_000_003 + iteration * 101 + tp_rank))
    return state


def train_batch_size(config: RunConfig, dp: int) -> int:
    """Sequences per global step: micro batch x gradient accumulation x data parallel."""
    return config.micro_batch_size * config.gradient_accumulation_steps * dp


def neox_config_text(shape: ModelShape, config: RunConfig, *, tp: int, dtype: torch.dtype,
                     seed: int = 1234) -> str:
    """A GPT-NeoX config in the style of ``configs/pythia/*.yml`` (JSON, which YAML reads).

    ``seed`` is GPT-NeoX's ``seed`` argument (``megatron/neox_arguments/neox_args.py``,
    default 1234), which seeds weight initialisation and data order; the PolyPythias runs
    differ in it alone.
    """
    precision: dict[str, Any] = {
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": config.loss_scale_window,
        "initial_scale_power": config.initial_scale_power,
        "hysteresis": config.hysteresis,
        "min_loss_scale": config.min_loss_scale,
    }
    if dtype == torch.bfloat16:
        precision = {"enabled": True, "type": "bfloat16", "auto_cast": True, **precision}
    else:
        precision = {"fp16": True, **precision}
    bucket = config.max_elements_per_comm
    cfg: dict[str, Any] = {
        "pipe_parallel_size": 1,
        "model_parallel_size": tp,
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_heads,
        "seq_length": shape.seq_length,
        "max_position_embeddings": shape.seq_length,
        "pos_emb": "rotary",
        "rotary_pct": shape.rotary_pct,
        "no_weight_tying": True,
        "gpt_j_residual": True,
        "output_layer_parallelism": "column",
        "scaled_upper_triang_masked_softmax_fusion": True,
        "bias_gelu_fusion": True,
        "init_method": "small_init",
        "output_layer_init_method": "wang_init",
        "optimizer": {
            "type": "Adam",
            "params": {"lr": config.lr, "betas": list(config.betas), "eps": config.eps},
        },
        "min_lr": config.min_lr,
        "zero_optimization": {
            "stage": 1,
            "allgather_partitions": True,
            "allgather_bucket_size": bucket,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": bucket,
            "contiguous_gradients": True,
            "cpu_offload": False,
        },
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "data_impl": "mmap",
        "num_workers": 1,
        "checkpoint_activations": True,
        "checkpoint_num_layers": 1,
        "partition_activations": True,
        "synchronize_each_layer": True,
        "gradient_clipping": config.gradient_clipping,
        "weight_decay": config.weight_decay,
        "hidden_dropout": 0,
        "attention_dropout": 0,
        "fp16": precision,
        "train_iters": config.train_iters,
        "lr_decay_iters": config.train_iters,
        "distributed_backend": "nccl",
        "lr_decay_style": config.decay_style,
        "warmup": config.warmup,
        "checkpoint_factor": 1000,
        "extra_save_iters": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
        "eval_interval": config.train_iters,
        "eval_iters": 10,
        "log_interval": 10,
        "steps_per_print": 10,
        "wall_clock_breakdown": True,
        "tokenizer_type": "HFTokenizer",
        "make_vocab_size_divisible_by": config.make_vocab_size_divisible_by,
        "seed": seed,
    }
    return json.dumps(cfg, indent=2) + "\n"
