"""The archive loader: memory-mapped tensors equal to what safetensors reads, clear errors."""

from __future__ import annotations

import doctest
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import exporter.archive.loader as loader
from exporter import open_archive
from exporter.errors import ArchiveError
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

STEPS = (0, 1, 2, 4, 8)
DENSE = "gpt_neox.layers.0.attention.dense.weight"
DEEPSPEED = Path(__file__).parent / "fixtures" / "deepspeed" / "dp2_z1_bf16" / "checkpoint"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny sample run (model weights and engine state) as an archive named ``archive``."""
    run = tmp_path_factory.mktemp("run")
    write_run(run, TINY, steps=STEPS, dp=2, config=tiny_run_config(STEPS[-1]))
    out = tmp_path_factory.mktemp("docs") / "archive"
    build(LocalSource(run), out, BuildOptions(quiet=True,
                                              export=ExportOptions(include=("model", "state"))))
    return out


@pytest.fixture(scope="module")
def full_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepSpeed-written checkpoint with everything: model, optimizer, buffers, state."""
    out = tmp_path_factory.mktemp("full") / "archive"
    build(LocalSource(DEEPSPEED, single_step=5), out, BuildOptions(quiet=True))
    return out


@pytest.mark.parametrize("which", ["archive", "full_archive"])
def test_every_tensor_equals_what_safetensors_load_file_reads(
    which: str, request: pytest.FixtureRequest
) -> None:
    root: Path = request.getfixturevalue(which)
    opened = open_archive(root)
    files: dict[str, dict[str, torch.Tensor]] = {}

    rows = opened.index.to_table().to_pylist()

    assert {r["kind"] for r in rows} >= {"model", "state"}
    for row in rows:
        expected = files.setdefault(row["file"], load_file(root / row["file"]))[row["name"]]
        got = opened.tensor(row["step"], row["name"], row["kind"])
        assert got.dtype == expected.dtype and got.shape == expected.shape, row["name"]
        assert torch.equal(got, expected), (row["kind"], row["name"])


def test_optimizer_kinds_read_their_own_files(full_archive: Path) -> None:
    opened = open_archive(full_archive)
    step = opened.steps[0]
    folder = full_archive / "steps" / f"step{step}"

    for kind in ("master", "exp_avg", "exp_avg_sq"):
        expected = load_file(folder / "optimizer" / f"{kind}.safetensors")
        got = opened.state_dict(step, kind)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[name], expected[name]) for name in expected), kind
    assert not torch.equal(opened.tensor(step, DENSE, "exp_avg"), opened.tensor(step, DENSE, "master"))


def test_state_dict_is_the_model_file_of_the_step(archive: Path) -> None:
    opened = open_archive(archive)

    for step in STEPS:
        expected = load_file(archive / "steps" / f"step{step}" / "model.safetensors")
        got = opened.state_dict(step)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_tensors_are_views_into_one_mapping_at_the_indexed_offsets(archive: Path) -> None:
    opened = open_archive(archive)
    rows = {r["name"]: r for r in opened.index.to_table().to_pylist()
            if r["step"] == 8 and r["kind"] == "model"}
    first, second = "gpt_neox.embed_in.weight", DENSE

    a, b = opened.tensor(8, first), opened.tensor(8, second)

    assert b.data_ptr() - a.data_ptr() == (
        rows[second]["data_offset_begin"] - rows[first]["data_offset_begin"])


def test_state_is_the_state_json_of_the_step(archive: Path) -> None:
    opened = open_archive(archive)

    for step in STEPS:
        expected = json.loads((archive / "steps" / f"step{step}" / "state.json").read_text())
        assert opened.state(step) == expected


def test_unknown_steps_names_and_kinds_are_named_in_archive_errors(archive: Path) -> None:
    opened = open_archive(archive)

    with pytest.raises(ArchiveError, match=r"no step 3 \(steps: \[0, 1, 2, 4, 8\]\)"):
        opened.tensor(3, DENSE)
    for call in (opened.state_dict, opened.state, opened.model_path):
        with pytest.raises(ArchiveError, match="no step 3"):
            call(3)
    with pytest.raises(ArchiveError, match="step 8 has no model tensor 'gpt_neox.nothing'"):
        opened.tensor(8, "gpt_neox.nothing")
    with pytest.raises(ArchiveError, match="step 8 has no exp_avg tensor"):
        opened.tensor(8, DENSE, kind="exp_avg")
    with pytest.raises(ArchiveError, match="step 8 has no master tensors"):
        opened.state_dict(8, "master")


def test_open_archive_refuses_what_is_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not an archive"):
        open_archive(tmp_path)
    with pytest.raises(ArchiveError, match="dataset repositories"):
        open_archive("hf://neox/a-model-repo")


def test_missing_and_corrupt_files_are_archive_errors(archive: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(archive, tmp_path / "archive"))
    (copy / "steps" / "step4" / "model.safetensors").unlink()
    corrupt = copy / "steps" / "step8" / "model.safetensors"
    data = corrupt.read_bytes()
    corrupt.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    opened = open_archive(copy)

    with pytest.raises(ArchiveError, match="missing steps/step4/model.safetensors"):
        opened.tensor(4, DENSE)
    with pytest.raises(ArchiveError, match="corrupt safetensors header"):
        opened.tensor(8, DENSE)
    assert torch.equal(opened.tensor(2, DENSE), open_archive(archive).tensor(2, DENSE))


def test_docstring_examples_run(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(archive.parent)
    runner = doctest.DocTestRunner()

    for test in doctest.DocTestFinder().find(loader):
        runner.run(test)

    assert runner.tries >= 10 and runner.failures == 0
