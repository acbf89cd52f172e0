"""Specification of the sample generator: Pythia-era GPT-NeoX checkpoints, tiny to Pythia-sized.

Expectations come from the format sources (DeeperSpeed eb7f5cff ``stage1.py`` / ``engine.py``,
GPT-NeoX ``checkpointing.py``) as summarised in DESIGN.md, and are checked by reading the
written files back with plain torch, independent of the generator's own bookkeeping.
"""

from __future__ import annotations

import doctest
import pickle
import pickletools
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from exporter.samples import (
    PYTHIA_160M,
    PYTHIA_410M,
    TINY,
    RunConfig,
    SampleSpecError,
    group_partitions,
    runs,
    tiny_run_config,
    write_checkpoint,
    write_run,
)
from exporter.samples.pickling import DynamicLossScaler, LossScaler

RUN_STEPS = [0, 1, 2, 4, 8]
BLOCK_KEYS = [
    "input_layernorm.weight",
    "input_layernorm.bias",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "attention.rotary_emb.inv_freq",
    "attention.dense.weight",
    "attention.dense.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
]
LAYER_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2"}
MP_RANK_GLOBALS = LAYER_GLOBALS | {
    "torch Size",
    "numpy.core.multiarray _reconstruct",
    "numpy ndarray",
    "numpy dtype",
    "_codecs encode",
    "__builtin__ set",
}
OPTIM_GLOBALS = MP_RANK_GLOBALS | {
    "deepspeed.runtime.fp16.loss_scaler DynamicLossScaler",
    "deepspeed.runtime.fp16.loss_scaler LossScaler",
    "deepspeed.runtime.zero.config ZeroStageEnum",
    "deepspeed.utils.tensor_fragment fragment_address",
}


class _StandInUnpickler(pickle.Unpickler):
    """Loads the loss scaler without importing deepspeed (keeps these tests fast)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "deepspeed.runtime.fp16.loss_scaler":
            return {"DynamicLossScaler": DynamicLossScaler, "LossScaler": LossScaler}[name]
        return super().find_class(module, name)


_STAND_IN_PICKLE = types.ModuleType("pickle")
_STAND_IN_PICKLE.Unpickler = _StandInUnpickler  # type: ignore[attr-defined]
_STAND_IN_PICKLE.load = pickle.load  # type: ignore[attr-defined]


def load(path: Path) -> Any:
    return torch.load(path, weights_only=False, pickle_module=_STAND_IN_PICKLE, map_location="cpu")


def pickle_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        data = archive.read(member)
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def storage_global(name: str) -> bool:
    return name.startswith("torch ") and name.endswith("Storage")


def no_decay(name: str) -> bool:
    """GPT-NeoX's rule: layer norms and biases go to the second param group."""
    return "norm" in name or name.endswith(".bias")


def reassemble(folder: Path, dp: int, tp_rank: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Undo ZeRO stage 1 the plain way: per group, concatenate the saved sub-partitions in
    order k = comm * dp + rank, then cut by ``param_shapes`` filtered to the group."""
    files = [
        load(folder / f"zero_pp_rank_{r}_mp_rank_{tp_rank:02d}_optim_states.pt") for r in range(dp)
    ]
    shapes = files[0]["param_shapes"]
    result: dict[str, dict[str, torch.Tensor]] = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for group, names in enumerate(
        [[n for n in shapes if not no_decay(n)], [n for n in shapes if no_decay(n)]]
    ):
        comms = files[0]["optimizer_state_dict"]["num_comm_intervals_per_group"][group]
        order = [(c, r) for c in range(comms) for r in range(dp)]
        osds = [f["optimizer_state_dict"] for f in files]
        flat = {
            "master": torch.cat(
                [osds[r]["local_sub_partitions_of_fp32_groups"][group][c] for c, r in order]
            ),
            "exp_avg": torch.cat(
                [osds[r]["base_optimizer_state"][group][c]["exp_avg"] for c, r in order]
            ),
            "exp_avg_sq": torch.cat(
                [osds[r]["base_optimizer_state"][group][c]["exp_avg_sq"] for c, r in order]
            ),
        }
        offset = 0
        for name in names:
            numel = shapes[name].numel()
            for kind, values in flat.items():
                result[kind][name] = values[offset : offset + numel].view(shapes[name])
            offset += numel
        assert offset == flat["master"].numel(), "saved sub-partitions hold more than the group"
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("run")
    return folder, write_run(folder, TINY, RUN_STEPS, dp=4)


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """Trained checkpoints with a comm size small enough for several intervals, dp 3 and 4."""
    config = tiny_run_config(3, max_elements_per_comm=4000)
    return {
        dp: write_checkpoint(
            tmp_path_factory.mktemp(f"dp{dp}"), TINY, dp=dp, train_steps=3, config=config
        )
        for dp in (3, 4)
    }


def test_run_writes_one_pythia_folder_per_step(run: tuple[Path, dict]) -> None:
    folder, truths = run
    assert sorted(p.name for p in folder.iterdir()) == [
        f"step{s}" for s in sorted(RUN_STEPS, key=str)
    ]
    expected = {f"layer_{i:02d}-model_00-model_states.pt" for i in (0, 2, 3, 5, 6)}
    expected |= {"mp_rank_00_model_states.pt", "tiny.yml"}
    expected |= {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)}
    for step in RUN_STEPS:
        assert {p.name for p in (folder / f"step{step}").iterdir()} == expected
        assert truths[step].iteration == truths[step].global_steps == step


def test_every_file_loads_with_plain_torch_load(run: tuple[Path, dict]) -> None:
    folder = run[0] / "step8"
    for path in sorted(folder.glob("*.pt")):
        assert isinstance(torch.load(path, weights_only=False), dict), path.name
    scaler = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)[
        "optimizer_state_dict"
    ]["loss_scaler"]
    assert type(scaler).__module__ == "deepspeed.runtime.fp16.loss_scaler"
    assert type(scaler).__name__ == "DynamicLossScaler"


def test_layer_files_hold_the_pipeline_keys_in_the_model_dtype(run: tuple[Path, dict]) -> None:
    folder = run[0] / "step4"
    embedding = load(folder / "layer_00-model_00-model_states.pt")
    assert type(embedding) is dict and list(embedding) == ["word_embeddings.weight"]
    assert embedding["word_embeddings.weight"].shape == (128, 32)
    for layer in (2, 3):
        block = load(folder / f"layer_{layer:02d}-model_00-model_states.pt")
        assert list(block) == BLOCK_KEYS
        assert all(t.dtype == torch.float16 for t in block.values())
        # head_dim 8, rotary_pct 0.25 -> 2 rotary dims -> one inverse frequency of 1.0
        assert block["attention.rotary_emb.inv_freq"].tolist() == [1.0]
    assert list(load(folder / "layer_05-model_00-model_states.pt")) == ["norm.weight", "norm.bias"]
    assert list(load(folder / "layer_06-model_00-model_states.pt")) == ["final_linear.weight"]


def test_layer_files_can_be_ordered_dicts(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY, step=5, dp=2, layer_container="ordered")
    assert type(load(tmp_path / "layer_02-model_00-model_states.pt")) is OrderedDict


def test_master_cast_to_fp16_equals_layer_weight_bitwise(run: tuple[Path, dict]) -> None:
    folder, truths = run
    for step in RUN_STEPS:
        truth = truths[step]
        for spec in truth.specs():
            layer = load(
                folder / f"step{step}" / f"layer_{spec.layer:02d}-model_00-model_states.pt"
            )
            cast = truth.master(spec.name).to(torch.float16)
            assert torch.equal(cast.view(torch.int16), layer[spec.key].view(torch.int16)), spec.name


def test_training_really_updates_the_weights(run: tuple[Path, dict]) -> None:
    truths = run[1]
    name = "2.attention.query_key_value.weight"
    assert not torch.equal(truths[0].master(name), truths[8].master(name))
    assert torch.count_nonzero(truths[0].exp_avg(name)) == 0
    assert torch.count_nonzero(truths[8].exp_avg(name)) > 0


def test_optim_files_reassemble_to_the_ground_truth(run: tuple[Path, dict]) -> None:
    folder, truths = run
    for step in (0, 8):
        rebuilt = reassemble(folder / f"step{step}", dp=4)
        names = [spec.name for spec in truths[step].specs()]
        assert sorted(rebuilt["master"]) == sorted(names)
        for name in names:
            for kind in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(rebuilt[kind][name], truths[step].tensor(kind, name)), (
                    step,
                    kind,
                    name,
                )


@pytest.mark.parametrize("dp", [3, 4])
def test_several_comm_intervals_and_trimmed_padding_occur(padded: dict[int, Any], dp: int) -> None:
    truth = padded[dp]
    osds = [
        load(truth.folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        for r in range(dp)
    ]
    assert osds[0]["num_comm_intervals_per_group"][0] > 1
    trimmed = 0
    for osd in osds:
        for group in osd["local_sub_partitions_of_fp32_groups"]:
            for tensor in group:
                whole = torch.empty(0).set_(tensor.untyped_storage())
                assert whole.numel() >= tensor.numel()
                assert torch.count_nonzero(whole[tensor.numel() :]) == 0, "padding is not zero"
                trimmed += whole.numel() - tensor.numel()
    assert trimmed > 0, "no sub-partition had padding trimmed"
    rebuilt = reassemble(truth.folder, dp=dp)
    for spec in truth.specs():
        assert torch.equal(rebuilt["master"][spec.name], truth.master(spec.name))
        assert torch.equal(rebuilt["exp_avg_sq"][spec.name], truth.exp_avg_sq(spec.name))


def test_optim_file_is_stage1_elastic_state_dict(run: tuple[Path, dict]) -> None:
    folder, truths = run
    saved = load(folder / "step8" / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    assert list(saved) == ["optimizer_state_dict", "param_shapes"]
    osd = saved["optimizer_state_dict"]
    assert list(osd) == [
        "loss_scaler",
        "dynamic_loss_scale",
        "overflow",
        "base_optimizer_state",
        "zero_stage",
        "partition_count",
        "num_comm_intervals_per_group",
        "local_sub_partitions_of_fp32_groups",
    ]
    assert (
        osd["zero_stage"] == 1 and osd["partition_count"] == 4 and osd["dynamic_loss_scale"] is True
    )
    assert osd["loss_scaler"].cur_scale == truths[8].loss_scale
    assert len(osd["base_optimizer_state"]) == len(osd["local_sub_partitions_of_fp32_groups"]) == 2
    for group in osd["base_optimizer_state"]:
        for state in group:
            assert list(state) == ["exp_avg", "exp_avg_sq"]  # no Adam step count is saved
    assert type(saved["param_shapes"]) is OrderedDict
    assert all(type(size) is torch.Size for size in saved["param_shapes"].values())
    assert list(saved["param_shapes"])[:3] == [
        "0.word_embeddings.weight",
        "2.input_layernorm.weight",
        "2.input_layernorm.bias",
    ]
    assert list(saved["param_shapes"])[-1] == "6.final_linear.weight"


def test_mp_rank_file_holds_engine_and_client_state(run: tuple[Path, dict]) -> None:
    folder, truths = run
    state = load(folder / "step8" / "mp_rank_00_model_states.pt")
    truth = truths[8]
    assert state["module"] is None and state["optimizer"] is None
    assert state["csr_tensor_module_names"] == set()
    assert (state["global_steps"], state["skipped_steps"], state["iteration"]) == (
        8,
        truth.skipped_steps,
        8,
    )
    assert state["global_samples"] == 8 * 2 * 4  # steps x micro batch x dp
    assert (state["dp_world_size"], state["mp_world_size"]) == (4, 1)
    assert state["lr_scheduler"]["num_iters"] == 8 - truth.skipped_steps
    assert state["args"]["padded_vocab_size"] == 128 and state["args"]["num_layers"] == 2
    assert state["np_rng_state"][0] == "MT19937" and isinstance(
        state["np_rng_state"][1], np.ndarray
    )
    assert state["torch_rng_state"].dtype == torch.uint8
    assert set(state["rng_tracker_states"]) == {"model-parallel-rng"}


def test_adam_step_is_one_plus_global_minus_skipped_steps(run: tuple[Path, dict]) -> None:
    truths = run[1]
    assert any(t.skipped_steps > 0 for t in truths.values()), "the run should skip an fp16 overflow"
    for truth in truths.values():
        assert truth.adam_step == 1 + truth.global_steps - truth.skipped_steps


def test_pickles_name_only_the_documented_globals(run: tuple[Path, dict]) -> None:
    folder = run[0] / "step8"
    for path in folder.glob("*.pt"):
        names = {n for n in pickle_globals(path) if not storage_global(n)}
        allowed = (
            LAYER_GLOBALS
            if path.name.startswith("layer_")
            else MP_RANK_GLOBALS
            if path.name.startswith("mp_rank_")
            else OPTIM_GLOBALS
        )
        assert names <= allowed, (path.name, names - allowed)
    assert "numpy.core.multiarray _reconstruct" in pickle_globals(
        folder / "mp_rank_00_model_states.pt"
    )
    optim = pickle_globals(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert "deepspeed.runtime.fp16.loss_scaler DynamicLossScaler" in optim
    assert "torch FloatStorage" in optim


def test_bf16_checkpoint_has_a_static_loss_scaler(tmp_path: Path) -> None:
    truth = write_checkpoint(tmp_path, TINY, step=3, dp=2, dtype=torch.bfloat16)
    osd = load(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    assert type(osd["loss_scaler"]) is LossScaler and osd["loss_scaler"].cur_scale == 1.0
    assert osd["dynamic_loss_scale"] is False
    assert "deepspeed.runtime.fp16.loss_scaler LossScaler" in pickle_globals(
        tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    layer = load(tmp_path / "layer_02-model_00-model_states.pt")
    weight = layer["mlp.dense_h_to_4h.weight"]
    assert weight.dtype == torch.bfloat16
    assert torch.equal(truth.master("2.mlp.dense_h_to_4h.weight").to(torch.bfloat16), weight)


def test_synthetic_step0_masters_are_half_exact_and_moments_zero(tmp_path: Path) -> None:
    truth = write_checkpoint(tmp_path, TINY, step=0, dp=3)
    rebuilt = reassemble(tmp_path, dp=3)
    for spec in truth.specs():
        master = rebuilt["master"][spec.name]
        assert torch.equal(master, master.half().float())
        assert torch.count_nonzero(rebuilt["exp_avg"][spec.name]) == 0
    assert truth.adam_step == 1 and truth.lr == 0.0


def test_synthetic_checkpoint_reassembles_and_keeps_the_invariant(tmp_path: Path) -> None:
    truth = write_checkpoint(tmp_path, TINY, step=2000, dp=4, seed=7)
    rebuilt = reassemble(tmp_path, dp=4)
    for spec in truth.specs():
        layer = load(tmp_path / f"layer_{spec.layer:02d}-model_00-model_states.pt")
        assert torch.equal(rebuilt["master"][spec.name], truth.master(spec.name))
        assert torch.equal(rebuilt["exp_avg"][spec.name], truth.exp_avg(spec.name))
        assert torch.equal(rebuilt["master"][spec.name].half(), layer[spec.key])
    assert bool((truth.exp_avg_sq("0.word_embeddings.weight") > 0).all())
    state = load(tmp_path / "mp_rank_00_model_states.pt")
    assert state["lr_scheduler"]["num_iters"] == 2000 - state["skipped_steps"]


def test_tensor_parallel_ranks_hold_local_shards(tmp_path: Path) -> None:
    truth = write_checkpoint(tmp_path, TINY, dp=2, tp=2, train_steps=2)
    names = {p.name for p in tmp_path.glob("*.pt")}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= names
    assert "zero_pp_rank_1_mp_rank_01_optim_states.pt" in names
    rank1 = load(tmp_path / "layer_02-model_01-model_states.pt")
    assert rank1["attention.query_key_value.weight"].shape == (48, 32)  # 3 * 32 / 2 rows
    assert rank1["attention.dense.weight"].shape == (32, 16)  # row parallel: input dim split
    rank0 = load(tmp_path / "layer_02-model_00-model_states.pt")
    assert torch.equal(rank0["input_layernorm.weight"], rank1["input_layernorm.weight"])
    rebuilt = reassemble(tmp_path, dp=2, tp_rank=1)
    for spec in truth.specs(1):
        assert torch.equal(rebuilt["master"][spec.name], truth.master(spec.name, 1))


def test_global_step_layout_writes_latest_and_configs_folder(tmp_path: Path) -> None:
    write_run(tmp_path, TINY, [0, 2], layout="global_step", dp=2)
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert (tmp_path / "global_step2" / "configs" / "tiny.yml").is_file()
    assert (tmp_path / "global_step0" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()


def test_cuda_storage_tags_need_a_map_location(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY, step=1, dp=2, cuda_storage_tags=True)
    with zipfile.ZipFile(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt") as archive:
        data = next(archive.read(n) for n in archive.namelist() if n.endswith("/data.pkl"))
    assert b"cuda:1" in data
    assert load(tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt")["param_shapes"]


def test_config_file_is_a_gpt_neox_yaml(run: tuple[Path, dict]) -> None:
    config = yaml.safe_load((run[0] / "step8" / "tiny.yml").read_text())
    assert (config["num_layers"], config["hidden_size"], config["num_attention_heads"]) == (
        2,
        32,
        4,
    )
    assert config["zero_optimization"]["stage"] == 1 and config["fp16"]["enabled"] is True
    assert config["gpt_j_residual"] is True and config["no_weight_tying"] is True


def test_pythia_shapes_have_the_published_parameter_counts() -> None:
    # Pythia paper, Table 1 / model cards: total parameters including both embeddings.
    assert PYTHIA_160M.num_parameters() == 162_322_944
    assert PYTHIA_410M.num_parameters() == 405_334_016


def test_pythia_410m_partitions_into_one_comm_interval_per_group() -> None:
    decay, no_decay = group_partitions(PYTHIA_410M, 1, 0, 32, RunConfig().max_elements_per_comm)
    assert decay.num_comm_intervals == no_decay.num_comm_intervals == 1
    assert decay.numel + no_decay.numel == 405_334_016
    assert decay.padded_numel - decay.numel < 32


def test_impossible_samples_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SampleSpecError):
        write_checkpoint(tmp_path, TINY, dtype=torch.float32)
    with pytest.raises(SampleSpecError):
        write_checkpoint(tmp_path, TINY, tp=3)
    with pytest.raises(SampleSpecError):
        write_run(tmp_path, TINY, [], dp=2)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(runs)
    assert result.attempted > 0 and result.failed == 0
