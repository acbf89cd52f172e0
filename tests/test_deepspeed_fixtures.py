"""The checkpoints in tests/fixtures/deepspeed are what DeepSpeed wrote, and their oracles
agree with them.

These tests read the fixtures with plain ``torch.load`` and the facts in DESIGN.md,
never with the exporter, so a failure here points at the fixtures, not at the package.
Regenerate with ``python tests/fixtures/make_deepspeed_fixtures.py``.
"""

from __future__ import annotations

import json
import pickletools
import re
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"

CASES = [
    "dp1_z1_fp32",
    "dp2_z1_bf16",
    "dp2_z1_fp16_skip",
    "dp3_z1_bf16",
    "dp3_z1_bf16_fp32grad",
    "pp2_dp2_z1_bf16",
    "seq_dp2_z2_fp32",
    "seq_dp2_z2rr_bf16",
    "seq_dp3_z2_fp16",
    "tp2_dp1_z1_fp16",
    "tp2_dp2_z1_bf16",
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# DESIGN.md "Pickled globals seen", plus what numpy 2 and DeepSpeed 0.19 add:
# numpy 2 moved ``_reconstruct`` to ``numpy._core``; DeepSpeed's DynamicLossScaler pickles
# its ``dtype`` attribute, ``torch.float16``.
LAYER_GLOBALS = re.compile(r"collections\.OrderedDict|torch\._utils\._rebuild_tensor_v2"
                           r"|torch\.\w+Storage")
ANY_GLOBALS = re.compile(
    LAYER_GLOBALS.pattern
    + r"|torch\.Size|numpy\.(_core|core)\.multiarray\._reconstruct|numpy\.ndarray|numpy\.dtype"
    r"|_codecs\.encode|(builtins|__builtin__)\.set"
    r"|deepspeed\.runtime\.fp16\.loss_scaler\.(Dynamic)?LossScaler"
    r"|deepspeed\.runtime\.zero\.config\.ZeroStageEnum"
    r"|deepspeed\.utils\.tensor_fragment\.fragment_address|torch\.float16"
)


@cache
def oracle_json(case: str) -> dict[str, Any]:
    return json.loads((FIXTURES / case / "oracle.json").read_text())


@cache
def oracle(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / case / "oracle.safetensors"))


@cache
def load(case: str, name: str) -> Any:
    return torch.load(FIXTURES / case / "checkpoint" / name, weights_only=False, map_location="cpu")


@cache
def neox(case: str) -> dict[str, Any]:
    return yaml.safe_load((FIXTURES / case / "checkpoint" / "neox.yml").read_text())


def model_rank_files(case: str) -> list[str]:
    folder = FIXTURES / case / "checkpoint"
    return sorted(p.name for p in folder.glob("mp_rank_*_model_states.pt"))


def saved_weights(case: str) -> dict[str, torch.Tensor]:
    """Model weights as written, keyed ``mp{tp}/{name}`` with pipeline-module names
    (``{layer}.{key}``) or, in the sequential form, the module's own ``sequential.`` names."""
    weights = {}
    for path in (FIXTURES / case / "checkpoint").glob("layer_*-model_*-model_states.pt"):
        layer, tp = re.match(r"layer_(\d+)-model_(\d+)-", path.name).groups()
        for key, value in load(case, path.name).items():
            weights[f"mp{tp}/{int(layer)}.{key}"] = value
    for name in model_rank_files(case):
        module = load(case, name)["module"]
        for key, value in (module or {}).items():
            weights[f"mp00/{key}"] = value
    return weights


def zero_partitions(case: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """For each mp_rank file: its name and the ``optimizer_state_dict`` of each dp rank."""
    info = oracle_json(case)
    prefix = "bf16_" if info["dtype"] == "bf16" else ""
    out = []
    for name in model_rank_files(case):
        mp = name[len("mp_rank_"):len("mp_rank_") + 2]
        states = [load(case, f"{prefix}zero_pp_rank_{d}_mp_rank_{mp}_optim_states.pt")
                  ["optimizer_state_dict"] for d in range(info["dp"])]
        out.append((name, states))
    return out


def oracle_key(case: str, model_rank_file: str, kind: str, name: str) -> str:
    """mp_rank_YY is the tensor-parallel rank, or the pipeline stage when pp > 1."""
    tp_rank = int(model_rank_file[len("mp_rank_"):][:2]) if oracle_json(case)["tp"] > 1 else 0
    return f"{kind}/mp{tp_rank:02d}/{name}"


def test_every_case_is_present() -> None:
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == CASES


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_files_are_named_by_the_parallel_layout(case: str) -> None:
    info = oracle_json(case)
    dp, tp, pp = info["dp"], info["tp"], info["pp"]
    n = neox(case)["num-layers"]
    model_ranks = tp * max(pp, 1)
    prefix = "bf16_" if info["dtype"] == "bf16" else ""
    expected = {"neox.yml"}
    expected |= {f"mp_rank_{m:02d}_model_states.pt" for m in range(model_ranks)}
    expected |= {f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
                 for d in range(dp) for m in range(model_ranks)}
    if pp > 0:
        layers = [0, *range(2, n + 2), n + 3, n + 4]
        expected |= {f"layer_{i:02d}-model_{t:02d}-model_states.pt"
                     for i in layers for t in range(tp)}
    actual = {p.name for p in (FIXTURES / case / "checkpoint").iterdir()}
    assert actual == expected
    assert info["tag"] == f"global_step{info['global_steps']}"


@pytest.mark.parametrize("case", CASES)
def test_layer_files_hold_gpt_neox_keys_and_shapes(case: str) -> None:
    info, cfg = oracle_json(case), neox(case)
    tp, h = info["tp"], cfg["hidden-size"]
    vocab = cfg["padded-vocab-size"]
    rotary = int(h // cfg["num-attention-heads"] * cfg["rotary-pct"])
    weights = saved_weights(case)
    names = {key.split("/", 1)[1].removeprefix("sequential.") for key in weights}
    n = cfg["num-layers"]
    block = {
        "input_layernorm.weight": [h], "input_layernorm.bias": [h],
        "attention.query_key_value.weight": [3 * h // tp, h],
        "attention.query_key_value.bias": [3 * h // tp],
        "attention.rotary_emb.inv_freq": [rotary // 2],
        "attention.dense.weight": [h, h // tp], "attention.dense.bias": [h],
        "post_attention_layernorm.weight": [h], "post_attention_layernorm.bias": [h],
        "mlp.dense_h_to_4h.weight": [4 * h // tp, h], "mlp.dense_h_to_4h.bias": [4 * h // tp],
        "mlp.dense_4h_to_h.weight": [h, 4 * h // tp], "mlp.dense_4h_to_h.bias": [h],
    }
    expected = {"0.word_embeddings.weight": [vocab // tp, h], f"{n + 3}.norm.weight": [h],
                f"{n + 3}.norm.bias": [h], f"{n + 4}.final_linear.weight": [vocab // tp, h]}
    for i in range(2, n + 2):
        expected |= {f"{i}.{key}": shape for key, shape in block.items()}
    assert names == set(expected)
    for key, value in weights.items():
        assert list(value.shape) == expected[key.split("/", 1)[1].removeprefix("sequential.")], key
        if key.endswith("inv_freq"):
            # A buffer: DeepSpeed casts the parameters to the training dtype, not the buffers.
            base = cfg["rotary-emb-base"]
            freqs = 1.0 / base ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
            torch.testing.assert_close(value.double(), freqs, rtol=1e-6, atol=0)
        else:
            assert value.dtype == DTYPES[info["dtype"]], key


@pytest.mark.parametrize("case", CASES)
def test_oracle_master_cast_to_model_dtype_equals_saved_weights_bitwise(case: str) -> None:
    dtype = DTYPES[oracle_json(case)["dtype"]]
    weights = saved_weights(case)
    masters = {k.split("/", 1)[1]: v for k, v in oracle(case).items() if k.startswith("master/")}
    assert masters
    for name, master in masters.items():
        assert master.dtype == torch.float32
        assert torch.equal(master.to(dtype), weights[name]), name
        assert torch.equal(oracle(case)[f"model/{name}"], weights[name]), name


@pytest.mark.parametrize("case", CASES)
def test_oracle_names_and_shapes_are_the_param_shapes(case: str) -> None:
    tensors = oracle(case)
    for kind in ("master", "exp_avg", "exp_avg_sq", "model"):
        recorded = {k.split("/", 1)[1]: v.shape
                    for k, v in tensors.items() if k.startswith(kind + "/")}
        declared = {}
        for name in model_rank_files(case):
            for group in load(case, name)["param_shapes"]:
                for param, shape in group.items():
                    declared[oracle_key(case, name, kind, param).split("/", 1)[1]] = shape
        assert recorded == declared, kind


@pytest.mark.parametrize("case", CASES)
def test_flat_partitions_in_param_shapes_order_reproduce_the_oracle(case: str) -> None:
    """Concatenating the dp ranks' fp32 partitions (and Adam moments) and cutting them in
    ``param_shapes`` order gives DeepSpeed's own full tensors: the layout the exporter
    relies on, including the last rank's padding and round-robin gradients."""
    tensors = oracle(case)
    for model_file, states in zero_partitions(case):
        groups = load(case, model_file)["param_shapes"]
        for g, shapes in enumerate(groups):
            flat = {
                "master": torch.cat([s["single_partition_of_fp32_groups"][g] for s in states]),
                "exp_avg": torch.cat([s["base_optimizer_state"]["state"][g]["exp_avg"]
                                      for s in states]),
                "exp_avg_sq": torch.cat([s["base_optimizer_state"]["state"][g]["exp_avg_sq"]
                                         for s in states]),
            }
            for kind, values in flat.items():
                offset = 0
                for name, shape in shapes.items():
                    piece = values[offset:offset + shape.numel()].view(shape)
                    offset += shape.numel()
                    assert torch.equal(piece, tensors[oracle_key(case, model_file, kind, name)]), (
                        kind, name)


@pytest.mark.parametrize("case", CASES)
def test_saved_param_slice_mappings_disagree_with_the_layout_only_under_round_robin(
        case: str) -> None:
    """DeepSpeed 0.19 saves ``param_slice_mappings`` computed in the original parameter order
    even when ``round_robin_gradients`` lays the flat groups out in another order."""
    agree = True
    for model_file, states in zero_partitions(case):
        for g, shapes in enumerate(load(case, model_file)["param_shapes"]):
            sizes = [s["single_partition_of_fp32_groups"][g].numel() for s in states]
            partition = states[0]["base_optimizer_state"]["state"][g]["exp_avg"].numel()
            offset = 0
            for name, shape in shapes.items():
                for rank, state in enumerate(states):
                    lo, hi = rank * partition, rank * partition + sizes[rank]
                    start, end = max(offset, lo), min(offset + shape.numel(), hi)
                    mapping = state["param_slice_mappings"][g].get(name)
                    if start < end:
                        agree &= mapping is not None and (mapping.start, mapping.numel) == (
                            start - lo, end - start)
                    else:
                        agree &= mapping is None
                offset += shape.numel()
    assert agree is not oracle_json(case)["round_robin_gradients"]


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("dp3") or "_dp3_" in c])
def test_dp3_cases_pad_their_flat_groups(case: str) -> None:
    paddings = [p for _, states in zero_partitions(case) for p in states[-1]["group_paddings"]]
    assert any(p > 0 for p in paddings)


@pytest.mark.parametrize("case", CASES)
def test_steps_in_the_files_match_the_oracle(case: str) -> None:
    info = oracle_json(case)
    assert info["adam_step"] == info["global_steps"] - info["skipped_steps"]
    for model_file, states in zero_partitions(case):
        engine = load(case, model_file)
        assert engine["global_steps"] == engine["iteration"] == info["global_steps"]
        assert engine["skipped_steps"] == info["skipped_steps"]
        for state in states:
            for group_state in state["base_optimizer_state"]["state"].values():
                assert float(group_state["step"]) == info["adam_step"]


def test_a_case_skips_an_overflowing_fp16_step() -> None:
    info = oracle_json("dp2_z1_fp16_skip")
    assert info["skipped_steps"] > 0
    assert info["adam_step"] < info["global_steps"]


@pytest.mark.parametrize("case", ["tp2_dp1_z1_fp16", "tp2_dp2_z1_bf16"])
def test_tensor_parallel_shards_differ(case: str) -> None:
    weights = saved_weights(case)
    for key in ("0.word_embeddings.weight", "2.attention.query_key_value.weight",
                "2.mlp.dense_4h_to_h.weight", "6.final_linear.weight"):
        assert not torch.equal(weights[f"mp00/{key}"], weights[f"mp01/{key}"]), key


def _torch_zip_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("case", CASES)
def test_pickles_use_only_the_known_globals(case: str) -> None:
    for path in (FIXTURES / case / "checkpoint").glob("*.pt"):
        found = _torch_zip_globals(path)
        allowed = LAYER_GLOBALS if path.name.startswith("layer_") else ANY_GLOBALS
        assert found and all(allowed.fullmatch(g) for g in found), (path.name, found)
        assert found == set(oracle_json(case)["pickled_globals"][path.name])


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("dp", "seq_"))])
def test_transformers_gpt_neox_from_the_saved_weights_reproduces_the_recorded_logits(
        case: str) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = neox(case)
    n = cfg["num-layers"]
    config = GPTNeoXConfig(
        vocab_size=cfg["padded-vocab-size"], hidden_size=cfg["hidden-size"],
        num_hidden_layers=n, num_attention_heads=cfg["num-attention-heads"],
        intermediate_size=4 * cfg["hidden-size"], hidden_act=cfg["activation"],
        max_position_embeddings=cfg["max-position-embeddings"],
        layer_norm_eps=cfg["layernorm-epsilon"], use_parallel_residual=cfg["gpt-j-residual"],
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rotary-emb-base"],
                         "partial_rotary_factor": cfg["rotary-pct"]},
        tie_word_embeddings=False)
    state = {}
    for key, value in saved_weights(case).items():
        layer, _, rest = key.split("/", 1)[1].removeprefix("sequential.").partition(".")
        layer = int(layer)
        if rest.endswith("inv_freq"):
            continue
        if layer == 0:
            state["gpt_neox.embed_in.weight"] = value
        elif layer == n + 3:
            state[f"gpt_neox.final_layer_norm.{rest.removeprefix('norm.')}"] = value
        elif layer == n + 4:
            state["embed_out.weight"] = value
        else:
            state[f"gpt_neox.layers.{layer - 2}.{rest}"] = value
    model = GPTNeoXForCausalLM(config).float().eval()
    if "embed_out.weight" not in model.state_dict():
        # transformers 5 calls the output layer lm_head (and renames embed_out when loading).
        state["lm_head.weight"] = state.pop("embed_out.weight")
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()},
                                                strict=False)
    assert not unexpected and all("rotary" in k or "masked_bias" in k for k in missing)
    with torch.no_grad():
        logits = model(oracle(case)["forward/input_ids"]).logits
    torch.testing.assert_close(logits, oracle(case)["forward/logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_neox_yml_describes_the_run(case: str) -> None:
    info, cfg = oracle_json(case), neox(case)
    assert cfg["model-parallel-size"] == info["tp"]
    assert cfg["pipe-parallel-size"] == info["pp"]
    assert cfg["zero_optimization"]["stage"] == info["zero_stage"]
    assert cfg["train_micro_batch_size_per_gpu"] == info["micro_batch_size"]
    assert cfg["padded-vocab-size"] % (cfg["make-vocab-size-divisible-by"] * info["tp"]) == 0
    assert cfg.get("fp16", {}).get("enabled", False) == (info["dtype"] == "fp16")
    assert cfg.get("bf16", {}).get("enabled", False) == (info["dtype"] == "bf16")
