"""Exports of Pythia-era checkpoints (DeeperSpeed elastic ZeRO stage 1) from the sample generator.

The generator (exporter.samples) keeps the unflattened truth of every tensor it wrote; the
exporter must give back exactly those tensors from the partition files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from exporter.neox.names import map_name, split_module_name
from exporter.pipeline.export import ExportOptions, export_checkpoint
from exporter.samples import TINY, RunConfig, tiny_run_config, write_checkpoint, write_run
from exporter.verify import verify_path


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _hf(name: str) -> str:
    layer, key = split_module_name(name)
    return map_name(layer, key, TINY.num_layers).hf_name


@pytest.mark.parametrize(
    "dp, train_steps, max_elements",
    [(3, 0, 999), (4, 2, 500), (1, 0, 500_000_000), (2, 3, 500_000_000)],
)
def test_every_optimizer_tensor_equals_the_generators_truth(
    tmp_path: Path, dp: int, train_steps: int, max_elements: int
) -> None:
    config = RunConfig(max_elements_per_comm=max_elements) if not train_steps else tiny_run_config(
        train_steps, max_elements_per_comm=max_elements)
    truth = write_checkpoint(tmp_path / "ck", TINY, dp=dp, train_steps=train_steps, config=config)
    if max_elements < 1000:
        # The layout really has several comm intervals and padding.
        assert any(p.num_comm_intervals > 1 for p in truth.partitions[0])
        assert any(any(p.paddings()) for p in truth.partitions[0])
    result = export_checkpoint(tmp_path / "ck", tmp_path / "out")
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        got = _read(tmp_path / "out" / "optimizer" / f"{kind}.safetensors")
        specs = [s for s in truth.specs() if not s.name.endswith("inv_freq")]
        assert len(got) == len(specs)
        for spec in specs:
            assert torch.equal(got[_hf(spec.name)], truth.tensor(kind, spec.name)), (kind, spec.name)
    model = _read(tmp_path / "out" / "model.safetensors")
    for spec in truth.specs():
        if not spec.name.endswith("inv_freq"):
            assert torch.equal(model[_hf(spec.name)], truth.weight(spec.name)), spec.name
    summary = result.optimizer.summary
    assert summary["adam_step"] == truth.adam_step
    assert summary["adam_step_source"].startswith("derived")
    assert summary["loss_scale"] == truth.loss_scale


def test_tensor_parallel_shards_merge_like_gpt_neox(tmp_path: Path) -> None:
    truth = write_checkpoint(tmp_path / "ck", TINY, dp=2, tp=2, train_steps=1,
                             config=tiny_run_config(1))
    export_checkpoint(tmp_path / "ck", tmp_path / "out")
    master = _read(tmp_path / "out" / "optimizer" / "master.safetensors")
    qkv = "2.attention.query_key_value.weight"
    dense = "2.attention.dense.weight"
    assert torch.equal(master[_hf(qkv)], torch.cat([truth.master(qkv, 0), truth.master(qkv, 1)], 0))
    assert torch.equal(master[_hf(dense)], torch.cat([truth.master(dense, 0), truth.master(dense, 1)], 1))
    reports = verify_path(tmp_path / "ck")
    assert all(r.ok for r in reports), reports[0].text()


def test_run_converts_step_by_step_and_verifies(tmp_path: Path) -> None:
    truths = write_run(tmp_path / "run", TINY, steps=(0, 1, 2), dp=2)
    for step, truth in truths.items():
        out = tmp_path / f"out{step}"
        export_checkpoint(tmp_path / "run" / f"step{step}", out, ExportOptions(dtype=torch.bfloat16))
        model = _read(out / "model.safetensors")
        name = "2.mlp.dense_h_to_4h.weight"
        assert model[_hf(name)].dtype == torch.bfloat16
        assert torch.equal(model[_hf(name)], truth.weight(name).to(torch.bfloat16))
        state = json.loads((out / "state.json").read_text())
        assert state["engine"]["mp_rank_00_model_states"]["iteration"] == truth.iteration
        assert verify_path(tmp_path / "run" / f"step{step}")[0].ok


def test_a_checkpoint_nested_one_folder_down_is_found(tmp_path: Path) -> None:
    # Hub branches or uploads may keep the files under global_stepN/ with the yml beside it.
    truth = write_checkpoint(tmp_path / "step5" / "global_step5", TINY, dp=2)
    (tmp_path / "step5" / "global_step5" / "tiny.yml").rename(tmp_path / "step5" / "tiny.yml")
    result = export_checkpoint(tmp_path / "step5", tmp_path / "out")
    assert result.optimizer is not None and result.optimizer.summary["adam_step"] == truth.adam_step
    assert (tmp_path / "out" / "neox.yml").read_text() == (tmp_path / "step5" / "tiny.yml").read_text()
    from exporter.sources import LocalSource

    assert LocalSource(tmp_path).steps() == [5]
