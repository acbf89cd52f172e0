"""Exports of checkpoints written by real DeepSpeed on CPU (tests/fixtures/deepspeed).

Model tensors are compared bitwise with ``torch.load`` of the source after GPT-NeoX's own
renaming / merge rules (re-implemented here from ``tools/ckpts/convert_neox_to_hf.py``);
optimizer tensors with the oracle DeepSpeed recorded itself at generation time
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exporter.errors import ExporterError, LayoutError
from exporter.pipeline.export import ExportOptions, export_checkpoint
from exporter.verify import verify_path

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "oracle.json").exists())

COLUMN = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "attention.query_key_value.weight",
          "attention.query_key_value.bias")
ROW = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
ROW_BIAS = ("mlp.dense_4h_to_h.bias", "attention.dense.bias")
NORM = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
        "post_attention_layernorm.bias")


def _merge(key: str, shards: list[torch.Tensor], kind: str = "model") -> torch.Tensor:
    """GPT-NeoX convert_neox_to_hf.py's rule for ``key`` (a layer-file key); these fixtures
    train with gpt-j-residual, so row-parallel biases add up. Adam's moments of a row-parallel
    bias are one rank's copy: every rank's copy gets the same gradient in GPT-NeoX."""
    if key in ROW_BIAS and kind in ("exp_avg", "exp_avg_sq"):
        return shards[0]
    if key in COLUMN or key in ("word_embeddings.weight", "final_linear.weight"):
        return torch.cat(shards, dim=0)
    if key in ROW:
        return torch.cat(shards, dim=1)
    if key in ROW_BIAS:
        return sum(shards)
    if key in NORM or key.startswith("norm."):
        return sum(shards) / len(shards)
    return shards[0]


def _hf_name(layer: int, key: str, num_layers: int) -> str:
    if layer == 0:
        return "gpt_neox.embed_in.weight"
    if layer == num_layers + 3:
        return f"gpt_neox.final_layer_norm.{key.split('.')[-1]}"
    if layer == num_layers + 4:
        return "embed_out.weight"
    return f"gpt_neox.layers.{layer - 2}.{key}"


def _source_model(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Hugging Face-named model tensors from torch.load of the source files."""
    num_layers = meta.get("num_layers") or 2
    per_layer: dict[tuple[int, str], list[torch.Tensor]] = {}
    layer_files = sorted(ckpt.glob("layer_*-model_*-model_states.pt"))
    if layer_files:
        for path in layer_files:
            layer = int(re.match(r"layer_(\d+)", path.name)[1])
            for key, value in torch.load(path, weights_only=False).items():
                per_layer.setdefault((layer, key), []).append(value)
    else:
        for path in sorted(ckpt.glob("mp_rank_*_model_states.pt")):
            for name, value in torch.load(path, weights_only=False)["module"].items():
                parts = name.split(".")
                per_layer.setdefault((int(parts[1]), ".".join(parts[2:])), []).append(value)
    return {_hf_name(layer, key, num_layers): _merge(key, shards)
            for (layer, key), shards in per_layer.items()}


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    case = FIXTURES / request.param
    out = tmp_path_factory.mktemp(request.param) / "out"
    result = export_checkpoint(case / "checkpoint", out)
    return case, out, result


def test_model_tensors_are_bitwise_the_source(exported) -> None:
    case, out, _ = exported
    meta = json.loads((case / "oracle.json").read_text())
    expected = _source_model(case / "checkpoint", meta)
    got = {**_read(out / "model.safetensors"), **_read(out / "buffers.safetensors")}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_optimizer_tensors_equal_deepspeeds_own_oracle(exported) -> None:
    case, out, result = exported
    oracle = _read(case / "oracle.safetensors")
    meta = json.loads((case / "oracle.json").read_text())
    num_layers = meta.get("num_layers") or 2
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        got = _read(out / "optimizer" / f"{kind}.safetensors")
        shards: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
        for key, tensor in oracle.items():
            if not key.startswith(f"{kind}/"):
                continue
            k, mp, module = key.split("/", 2)
            layer, param = module.removeprefix("sequential.").split(".", 1)
            shards.setdefault((int(layer), param), []).append((int(mp[2:]), tensor))
        assert len(got) == len(shards) > 0
        for (layer, param), ranked in shards.items():
            # Units of one pipeline stage hold the same names; their mp order is the TP order.
            tensors = [t for _, t in sorted(ranked, key=lambda x: x[0])]
            expected = _merge(param, tensors, kind)
            name = _hf_name(layer, param, num_layers)
            assert got[name].dtype == torch.float32
            assert torch.equal(got[name], expected), f"{kind} {name}"


def test_adam_step_and_engine_state_are_recorded(exported) -> None:
    case, out, result = exported
    meta = json.loads((case / "oracle.json").read_text())
    state = json.loads((out / "state.json").read_text())
    assert result.optimizer is not None
    assert result.optimizer.summary["adam_step"] == int(meta["adam_step"])
    assert result.engine.iteration == meta["global_steps"]
    assert "engine" in state and "optimizer" in state


def test_verify_passes_on_source_and_export(exported) -> None:
    case, out, _ = exported
    for target in (case / "checkpoint", out):
        reports = verify_path(target)
        assert all(r.ok for r in reports), "\n".join(r.text() for r in reports)


@pytest.mark.parametrize("case", ["dp3_z1_bf16", "seq_dp3_z2_fp16"])
def test_verify_names_the_tensor_when_partition_files_are_swapped(tmp_path: Path, case: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / case / "checkpoint", ckpt)
    files = sorted(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))
    a, b = files[0], files[1]
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    reports = verify_path(ckpt)
    assert not all(r.ok for r in reports)
    text = "\n".join(r.text() for r in reports)
    assert "differs from the model weight" in text and "gpt_neox." in text


def test_truncated_partition_file_fails_with_its_name(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "dp2_z1_bf16" / "checkpoint", ckpt)
    victim = sorted(ckpt.glob("*zero_pp_rank_1_*"))[0]
    victim.write_bytes(victim.read_bytes()[:-5000])
    reports = verify_path(ckpt)
    assert not reports[0].ok and victim.name in reports[0].text()
    out = tmp_path / "out"
    with pytest.raises(ExporterError, match=victim.name):
        export_checkpoint(ckpt, out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_missing_rank_file_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "dp3_z1_bf16" / "checkpoint", ckpt)
    sorted(ckpt.glob("*zero_pp_rank_1_*"))[0].unlink()
    out = tmp_path / "out"
    with pytest.raises(LayoutError, match="data-parallel rank"):
        export_checkpoint(ckpt, out)
    assert not out.exists()


def test_partition_count_disagreeing_with_files_is_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "dp3_z1_bf16" / "checkpoint", ckpt)
    sorted(ckpt.glob("*zero_pp_rank_2_*"))[0].unlink()
    # Files for ranks 0..1 remain: a consistent-looking set whose partition_count says 3.
    with pytest.raises(LayoutError, match="partition_count"):
        export_checkpoint(ckpt, tmp_path / "out")


def test_model_only_export_needs_no_optimizer_files(tmp_path: Path) -> None:
    result = export_checkpoint(FIXTURES / "dp2_z1_bf16" / "checkpoint", tmp_path / "out",
                               ExportOptions(include=("model",)))
    assert result.optimizer is None
    assert not (tmp_path / "out" / "optimizer").exists()
    assert {r.job.kind for r in result.records} == {"model", "buffer"}


def test_one_param_shapes_dict_for_all_groups_is_split_like_gpt_neox(tmp_path: Path) -> None:
    # Older engines saved param_shapes as one OrderedDict; the groups follow GPT-NeoX's
    # weight-decay rule (norms and biases apart), each keeping its own order.
    import collections

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "dp2_z1_bf16" / "checkpoint", ckpt)
    path = ckpt / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)  # our own fixture
    merged = collections.OrderedDict()
    for group in state["param_shapes"]:
        merged.update(group)
    state["param_shapes"] = merged
    torch.save(state, path)
    export_checkpoint(ckpt, tmp_path / "one")
    export_checkpoint(FIXTURES / "dp2_z1_bf16" / "checkpoint", tmp_path / "groups")
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        one = _read(tmp_path / "one" / "optimizer" / f"{kind}.safetensors")
        groups = _read(tmp_path / "groups" / "optimizer" / f"{kind}.safetensors")
        assert one.keys() == groups.keys()
        assert all(torch.equal(one[k], groups[k]) for k in one), kind
