"""What a checkpoint says about itself: settings from its engine state when no YAML is there,
the learning rate where the files do not store it, and features that cannot be exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from neox_builders import gpt_neox_layers, llama_layers, write_checkpoint
from neox_cases import CASES, HEADS, LAYERS, hf_model, neox_yaml
from safetensors import safe_open

from exporter.errors import ExporterError, LayoutError, UnsupportedModelError
from exporter.neox.schedule import annealing_lr
from exporter.pipeline.export import ExportOptions, export_checkpoint
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.samples import write_checkpoint as write_pythia
from exporter.sources import LocalSource

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _pythia(folder: Path, **kw) -> Path:
    write_pythia(folder, TINY, dp=1, **kw)
    return folder


# --- settings from mp_rank_XX args ------------------------------------------------------


def test_a_checkpoint_without_yaml_exports_with_the_sizes_its_args_record(tmp_path: Path) -> None:
    ck = _pythia(tmp_path / "ck")
    export_checkpoint(ck, tmp_path / "with_yaml", ExportOptions(include=("model", "state")))
    for path in ck.glob("*.yml"):
        path.unlink()
    export_checkpoint(ck, tmp_path / "without", ExportOptions(include=("model", "state")))
    config = json.loads((tmp_path / "without" / "config.json").read_text())
    assert config["num_attention_heads"] == TINY.num_heads
    assert config["hidden_size"] == TINY.hidden_size
    assert config["num_hidden_layers"] == TINY.num_layers
    assert config["max_position_embeddings"] == TINY.seq_length
    # the saved inv_freq tells how many head dims rotate
    assert config["rotary_pct"] == json.loads(
        (tmp_path / "with_yaml" / "config.json").read_text())["rotary_pct"]
    want = _read(tmp_path / "with_yaml" / "model.safetensors")
    got = _read(tmp_path / "without" / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # with a YAML, settings it leaves unset are GPT-NeoX's defaults, which training used
    with_yaml = json.loads((tmp_path / "with_yaml" / "state.json").read_text())["model"]
    assert with_yaml["config_source"] == "YAML config"
    assert with_yaml["assumed_gpt_neox_defaults"] == {}
    notes = json.loads((tmp_path / "without" / "state.json").read_text())["model"]
    assert notes["config_source"] == "mp_rank_00_model_states.pt args"
    # what neither a YAML nor the args record is named, with the default that was taken
    assert notes["assumed_gpt_neox_defaults"]["gpt_j_residual"] is False


def test_a_llama_checkpoint_without_yaml_reads_its_architecture_off_the_tensors(tmp_path: Path) -> None:
    case = _case("llama_grouped_query")
    sd = hf_model(case, seed=3).state_dict()
    args = {"num_layers": LAYERS, "hidden_size": 32, "num_attention_heads": HEADS,
            "max_position_embeddings": 64, "padded_vocab_size": 64, "model_parallel_size": 2}
    write_checkpoint(tmp_path / "ck", llama_layers(sd, layers=LAYERS, heads=HEADS, kv_heads=2, tp=2),
                     args=args, yaml_config=None)
    export_checkpoint(tmp_path / "ck", tmp_path / "out", ExportOptions(include=("model", "state")))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["hidden_act"] == "silu"
    got = _read(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    assumed = json.loads((tmp_path / "out" / "state.json").read_text())["model"]["assumed_gpt_neox_defaults"]
    assert {"activation", "rms_norm_epsilon", "num_kv_heads"} <= set(assumed)


def test_yaml_and_args_that_disagree_are_refused_naming_both(tmp_path: Path) -> None:
    ck = _pythia(tmp_path / "ck")
    (path,) = ck.glob("*.yml")
    cfg = yaml.safe_load(path.read_text())
    cfg["num_attention_heads"] = 8
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(LayoutError, match=r"num-attention-heads: 8.*args say 4"):
        export_checkpoint(ck, tmp_path / "out")


# --- learning rate -------------------------------------------------------------------------


def test_pythia_era_learning_rate_is_derived_from_the_scheduler_state(tmp_path: Path) -> None:
    truth = write_pythia(tmp_path / "ck", TINY, dp=1, train_steps=3, config=tiny_run_config(3))
    result = export_checkpoint(tmp_path / "ck", tmp_path / "out")
    summary = result.optimizer.summary
    assert summary["learning_rate"] == pytest.approx(truth.lr, rel=1e-12)
    assert summary["learning_rate_source"].startswith("derived: GPT-NeoX AnnealingLR.get_lr")


def test_current_deepspeed_learning_rate_is_read_from_the_param_groups(tmp_path: Path) -> None:
    result = export_checkpoint(FIXTURES / "dp2_z1_bf16" / "checkpoint", tmp_path / "out")
    assert result.optimizer.summary["learning_rate_source"] == "optimizer state (param_groups lr)"
    assert result.optimizer.summary["learning_rate"] == pytest.approx(
        result.optimizer.state_json["units"]["mp_rank_00"]["groups"][0]["hyperparameters"]["lr"])


def test_the_checkpoint_index_holds_the_learning_rate_and_its_source(tmp_path: Path) -> None:
    config = tiny_run_config(2)
    write_run(tmp_path / "run", TINY, steps=(0, 2), dp=1, config=config)
    build(LocalSource(tmp_path / "run"), tmp_path / "a", BuildOptions(quiet=True))
    rows = pq.read_table(tmp_path / "a" / "index" / "checkpoints").to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert row["learning_rate"] is not None
        assert row["learning_rate_source"].startswith("derived")
    last = max(rows, key=lambda r: r["step"])
    assert last["learning_rate"] == pytest.approx(config.lr_at(last["iteration"] - last["skipped_steps"]))


SCHED = {"start_lr": 1e-3, "min_lr": 1e-4, "warmup_iter": 10, "end_iter": 110}


@pytest.mark.parametrize("formula", ["2022", "2023"])
def test_annealing_lr_warms_up_linearly_to_the_start_lr(formula: str) -> None:
    for style in ("cosine", "linear", "exponential", "constant"):
        state = {**SCHED, "decay_style": style}
        assert annealing_lr({**state, "num_iters": 5}, formula) == pytest.approx(5e-4)
        assert annealing_lr({**state, "num_iters": 10}, formula) == pytest.approx(1e-3)


def test_annealing_lr_cosine_follows_each_eras_formula() -> None:
    state = {**SCHED, "decay_style": "cosine"}
    # since 2023-09: from start_lr to min_lr over end_iter - warmup_iter
    assert annealing_lr({**state, "num_iters": 60}, "2023") == pytest.approx(5.5e-4)
    assert annealing_lr({**state, "num_iters": 110}, "2023") == pytest.approx(1e-4)
    # 2022 (Pythia): half of start_lr once (num_iters - warmup) is half of end_iter; the count is
    # clipped to end_iter - warmup_iter, and min_lr only bounds the result
    assert annealing_lr({**state, "num_iters": 65}, "2022") == pytest.approx(5e-4)
    assert annealing_lr({**state, "num_iters": 10_000}, "2022") == pytest.approx(
        annealing_lr({**state, "num_iters": 100}, "2022"))


# --- row-parallel biases and replicas ------------------------------------------------------


def _case(name: str):
    return next(c for c in CASES if c.name == name)


def test_row_parallel_biases_that_differ_across_ranks_without_gpt_j_are_refused(tmp_path: Path) -> None:
    case = _case("gpt_neox_linear_names")
    sd = hf_model(case, seed=3).state_dict()
    layers = gpt_neox_layers(sd, layers=LAYERS, tp=2, gpt_j_residual=False)
    layers[2][1]["attention.dense.bias"] = layers[2][1]["attention.dense.bias"] + 1
    write_checkpoint(tmp_path / "ck", layers, args={"num_attention_heads": HEADS},
                     yaml_config=neox_yaml(case))
    with pytest.raises(LayoutError, match=r"gpt_neox.layers.0.attention.dense.bias: .*different copies"):
        export_checkpoint(tmp_path / "ck", tmp_path / "out", ExportOptions(include=("model",)))


def test_moments_of_a_summed_bias_are_one_ranks_and_a_disagreement_is_recorded(tmp_path: Path) -> None:
    case = _case("gpt_neox_linear_names_gpt_j")
    sd = hf_model(case, seed=3).state_dict()
    moments = {k: {n: torch.full_like(t, 0.5) for n, t in sd.items()} for k in ("exp_avg", "exp_avg_sq")}
    shards = {k: gpt_neox_layers(v, layers=LAYERS, tp=2, gpt_j_residual=False) for k, v in moments.items()}
    shards["exp_avg"][3][1]["mlp.linear2.bias"] = torch.full((32,), 0.25)
    write_checkpoint(tmp_path / "ck", gpt_neox_layers(sd, layers=LAYERS, tp=2, gpt_j_residual=True),
                     args={}, yaml_config=neox_yaml(case), moments=shards)
    export_checkpoint(tmp_path / "ck", tmp_path / "out")
    exp_avg = _read(tmp_path / "out" / "optimizer" / "exp_avg.safetensors")
    assert torch.equal(exp_avg["gpt_neox.layers.0.attention.dense.bias"], torch.full((32,), 0.5))
    assert torch.equal(exp_avg["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"], torch.full((32,), 0.5))
    note = json.loads((tmp_path / "out" / "state.json").read_text())["optimizer"]["tensor_parallel"]
    assert note["replicas_that_disagree"] == ["exp_avg gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    assert "2 copies" in note["row_parallel_bias_moments"]


# --- what cannot be exported ----------------------------------------------------------------


@pytest.mark.parametrize("setting, value, named", [
    ("moe-num-experts", 4, "mixture-of-experts"),
    ("attention-config", [[["mamba"], LAYERS]], "mamba"),
    ("attention-config", [[["rwkv"], LAYERS]], "rwkv"),
    ("gpt-j-tied", True, "gpt-j-tied"),
    ("pos-emb", "alibi", "alibi"),
    ("activation", "geglu", "geglu"),
])
def test_features_without_a_faithful_transformers_model_are_refused_in_one_line(
        tmp_path: Path, setting: str, value: object, named: str) -> None:
    case = _case("gpt_neox_linear_names")
    sd = hf_model(case, seed=3).state_dict()
    write_checkpoint(tmp_path / "ck", gpt_neox_layers(sd, layers=LAYERS, tp=1, gpt_j_residual=False),
                     args={}, yaml_config={**neox_yaml(case), setting: value})
    with pytest.raises(UnsupportedModelError, match=named) as err:
        export_checkpoint(tmp_path / "ck", tmp_path / "out")
    assert isinstance(err.value, ExporterError) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_command_line_refuses_in_one_line_with_exit_code_1(tmp_path: Path) -> None:
    case = _case("gpt_neox_linear_names")
    sd = hf_model(case, seed=3).state_dict()
    write_checkpoint(tmp_path / "ck", gpt_neox_layers(sd, layers=LAYERS, tp=1, gpt_j_residual=False),
                     args={}, yaml_config={**neox_yaml(case), "moe-num-experts": 8})
    done = subprocess.run([sys.executable, "-m", "exporter", "convert", str(tmp_path / "ck"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mixture-of-experts" in lines[0], done.stderr


def test_a_mamba_block_is_refused_from_its_module_names_alone(tmp_path: Path) -> None:
    case = _case("gpt_neox_linear_names")
    sd = hf_model(case, seed=3).state_dict()
    layers = gpt_neox_layers(sd, layers=LAYERS, tp=1, gpt_j_residual=False)
    # GPT-NeoX ParallelMambaResidualLayer: a norm and a ParallelMambaBlock called mixer
    layers[2] = [{"norm.weight": torch.ones(32), "mixer.in_proj.weight": torch.zeros(128, 32)}]
    write_checkpoint(tmp_path / "ck", layers, args={}, yaml_config=neox_yaml(case))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        export_checkpoint(tmp_path / "ck", tmp_path / "out")


@pytest.mark.parametrize("dropped, named", [("mlp.linear1.bias", "MLP biases"),
                                            ("attention.query_key_value.bias", "attention biases")])
def test_a_layernorm_model_without_biases_is_refused(tmp_path: Path, dropped: str, named: str) -> None:
    case = _case("gpt_neox_linear_names")
    layers = gpt_neox_layers(hf_model(case, seed=3).state_dict(), layers=LAYERS, tp=1,
                             gpt_j_residual=False)
    for layer in range(2, 2 + LAYERS):
        del layers[layer][0][dropped]
    write_checkpoint(tmp_path / "ck", layers, args={}, yaml_config=neox_yaml(case))
    with pytest.raises(UnsupportedModelError, match=named):
        export_checkpoint(tmp_path / "ck", tmp_path / "out")


def test_llama_with_gpt_j_residual_is_refused(tmp_path: Path) -> None:
    case = _case("llama_multi_head")
    sd = hf_model(case, seed=3).state_dict()
    write_checkpoint(tmp_path / "ck", llama_layers(sd, layers=LAYERS, heads=HEADS, kv_heads=HEADS, tp=1),
                     args={}, yaml_config={**neox_yaml(case), "gpt-j-residual": True})
    with pytest.raises(UnsupportedModelError, match="gpt-j-residual"):
        export_checkpoint(tmp_path / "ck", tmp_path / "out")


def test_a_one_layer_llama_checkpoint_exports(tmp_path: Path) -> None:
    """GPT-NeoX's converter sniffs names from pipeline layer 3, which a 1-layer model lacks."""
    case = _case("llama_grouped_query")
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=HEADS, num_key_value_heads=2,
                                      intermediate_size=48, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    layers = llama_layers(model.state_dict(), layers=1, heads=HEADS, kv_heads=2, tp=2)
    write_checkpoint(tmp_path / "ck", layers, args={"num_layers": 1},
                     yaml_config={**neox_yaml(case), "num-layers": 1})
    export_checkpoint(tmp_path / "ck", tmp_path / "out", ExportOptions(include=("model",)))
    got = _read(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(model.state_dict())
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
