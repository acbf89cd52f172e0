"""transformers loads exported model folders, with no missing weights, and computes the same logits
as a model built directly from torch.load of the source layer files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from exporter.pipeline.export import ExportOptions, export_checkpoint
from exporter.samples import TINY, tiny_run_config, write_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"


def _reference_state(ckpt: Path, num_layers: int) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(ckpt.glob("layer_*-model_00-model_states.pt")):
        layer = int(re.match(r"layer_(\d+)", path.name)[1])
        for key, value in torch.load(path, weights_only=False).items():
            if key.endswith("inv_freq"):
                continue
            if layer == 0:
                name = "gpt_neox.embed_in.weight"
            elif layer == num_layers + 3:
                name = "gpt_neox.final_layer_norm." + key.split(".")[-1]
            elif layer == num_layers + 4:
                name = "embed_out.weight"
            else:
                name = f"gpt_neox.layers.{layer - 2}.{key}"
            state[name] = value
    return state


def _logits_match(out: Path, ckpt: Path, num_layers: int, dtype: torch.dtype) -> None:
    loaded, info = transformers.GPTNeoXForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"], info
    assert not info["mismatched_keys"], info
    config = transformers.AutoConfig.from_pretrained(out)
    reference = transformers.GPTNeoXForCausalLM(config).to(dtype)
    source = _reference_state(ckpt, num_layers)
    own = reference.state_dict()
    for name, tensor in source.items():
        target = "lm_head.weight" if name == "embed_out.weight" and name not in own else name
        own[target].copy_(tensor)
    reference.eval()
    loaded.eval()
    tokens = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits.float()
        got = loaded(tokens).logits.float()
    assert torch.equal(got, expected)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pythia_era_export_loads_and_matches(tmp_path: Path, dtype: torch.dtype) -> None:
    write_checkpoint(tmp_path / "ck", TINY, dp=2, dtype=dtype, train_steps=2,
                     config=tiny_run_config(2))
    export_checkpoint(tmp_path / "ck", tmp_path / "out", ExportOptions(include=("model",)))
    _logits_match(tmp_path / "out", tmp_path / "ck", TINY.num_layers, torch.float32)


def test_deepspeed_written_export_loads_and_matches(tmp_path: Path) -> None:
    ckpt = FIXTURES / "dp1_z1_fp32" / "checkpoint"
    export_checkpoint(ckpt, tmp_path / "out", ExportOptions(include=("model",)))
    _logits_match(tmp_path / "out", ckpt, 2, torch.float32)


def test_sharded_export_loads_like_a_single_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    write_checkpoint(ckpt, TINY, dp=1)
    export_checkpoint(ckpt, tmp_path / "out", ExportOptions(include=("model",), max_shard_size=20_000))
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    _logits_match(tmp_path / "out", ckpt, TINY.num_layers, torch.float32)
