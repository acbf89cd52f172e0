"""Sample GPT-NeoX runs in the Pythia-era file layout, from tiny to Pythia-sized.

The demo, the tests and the benchmarks share this generator. It writes what EleutherAI's raw
Pythia checkpoints hold (Hub repositories such as ``EleutherAI/neox-ckpt-pythia-410m-seed8``),
as GPT-NeoX (Oct 2022) on EleutherAI's DeeperSpeed (commit eb7f5cff, DeepSpeed 0.3.15) saved
them with a ``PipelineModule`` and ZeRO stage 1 with elastic checkpoints:

``layer_{LL:02d}-model_{TT:02d}-model_states.pt``
    ``PipelineModule.save_state_dict`` (``deepspeed/runtime/pipe/module.py``): one file per
    pipeline layer with parameters, per tp rank ``TT``: a ``dict`` of name -> tensor in the model
    dtype, including the persistent ``attention.rotary_emb.inv_freq`` buffer of each block.
    Layers: 0 embedding, 2..N+1 blocks, N+3 final norm, N+4 ``final_linear`` (1 and N+2 are
    functions without a file).

``mp_rank_{TT:02d}_model_states.pt``
    ``DeepSpeedEngine._save_checkpoint`` (``deepspeed/runtime/engine.py``): ``module`` (None),
    ``optimizer`` (None under ZeRO), ``lr_scheduler`` (GPT-NeoX ``AnnealingLR.state_dict``),
    ``csr_tensor_module_names`` (a set), ``skipped_steps``, ``global_steps``, ``global_samples``,
    ``dp_world_size``, ``mp_world_size``; then GPT-NeoX's client state
    (``megatron/checkpointing.py`` ``save_ds_checkpoint``): ``iteration``, ``args`` (a plain
    dict of eight model keys), ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``,
    ``cuda_rng_state``, ``rng_tracker_states``.

``zero_pp_rank_{R}_mp_rank_{TT:02d}_optim_states.pt``
    ``DeepSpeedEngine._save_zero_checkpoint``: ``{"optimizer_state_dict": ...,
    "param_shapes": OrderedDict(name -> torch.Size)}`` with every module parameter in
    ``named_parameters()`` order. ``optimizer_state_dict`` is
    ``FP16_DeepSpeedZeroOptimizer_Stage1._elastic_state_dict()``
    (``deepspeed/runtime/zero/stage1.py``): ``loss_scaler`` (a pickled
    ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler``; ``LossScaler`` for bf16),
    ``dynamic_loss_scale``, ``overflow``, ``base_optimizer_state`` (list[group] -> list[comm
    interval] -> ``{"exp_avg", "exp_avg_sq"}``; FusedAdam keeps ``step`` in the param group,
    which is not saved), ``zero_stage`` (1), ``partition_count`` (dp),
    ``num_comm_intervals_per_group``, ``local_sub_partitions_of_fp32_groups`` (list[group] ->
    list[comm interval] -> fp32 tensor). Two groups as GPT-NeoX's
    ``get_params_for_weight_decay_optimization`` builds them: 0 = weights, 1 = norms and biases.
    Each group is flattened, padded at the end and cut into ``dp * num_comm_intervals``
    sub-partitions; sub-partition ``k`` is rank ``k % dp``'s entry for comm interval
    ``k // dp``; saved tensors are trimmed of padding (their storages are not).

``<name>.yml``
    The GPT-NeoX config, as in ``configs/pythia/410M.yml``.

Adam's step count is in no file: it is ``1 + global_steps - skipped_steps`` for a run that
never resumed (the set-up step of ``_initialize_optimizer_states`` plus every step that did not
overflow).

Speed (measured on the 2-core, 24 GiB development machine): a synthetic ``PYTHIA_160M``
checkpoint with dp=8 (2.2 GB) takes about 17 s and a ``PYTHIA_410M`` one with dp=32 (5.7 GB)
about 34 s, bound by disk writes (about 6 s of CPU for 160M); peak memory stays under 1 GB,
about one file's tensors in fp32 plus torch itself. A tiny trained run of five checkpoints
takes about 0.3 s.
"""

from exporter.samples.runs import tiny_run_config, write_checkpoint, write_run
from exporter.samples.shapes import (
    PYTHIA_160M,
    PYTHIA_410M,
    TINY,
    ModelShape,
    Parallel,
    ParamSpec,
    SampleSpecError,
    parameter_specs,
)
from exporter.samples.state import RunConfig
from exporter.samples.writer import (
    CheckpointTruth,
    group_partitions,
    layer_file_name,
    mp_rank_file_name,
    optim_file_name,
)
from exporter.samples.zero import GroupPartition

__all__ = [
    "PYTHIA_160M",
    "PYTHIA_410M",
    "TINY",
    "CheckpointTruth",
    "GroupPartition",
    "ModelShape",
    "Parallel",
    "ParamSpec",
    "RunConfig",
    "SampleSpecError",
    "group_partitions",
    "layer_file_name",
    "mp_rank_file_name",
    "optim_file_name",
    "parameter_specs",
    "tiny_run_config",
    "write_checkpoint",
    "write_run",
]
