"""After `build --push-to ... --delete-after-push`, the local archive still verifies and reads:
verify checks what is local and names the steps that live only on the Hub; the loader reads
their tensors from the dataset and commit the `.push/` record names."""

from __future__ import annotations

from pathlib import Path

import blake3
import torch
from click.testing import CliRunner
from hubserver import HubServer

from exporter import open_archive
from exporter.archive.push_state import read_push_record
from exporter.cli import cli
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.verify import verify_path

DENSE = "gpt_neox.layers.0.attention.dense.weight"


def test_verify_and_loader_know_files_removed_after_push(hub_server: HubServer, tmp_path: Path) -> None:
    write_run(tmp_path / "run", TINY, steps=(0, 1), dp=2, config=tiny_run_config(1))
    out = tmp_path / "a"
    built = CliRunner().invoke(cli, ["-q", "build", str(tmp_path / "run"), "--out", str(out),
                                     "--push-to", "neox/gone", "--delete-after-push"])
    assert built.exit_code == 0, built.output
    assert not (out / "steps" / "step1" / "model.safetensors").exists()
    record = read_push_record(out, 1)
    assert record is not None and record.commit

    reports = verify_path(out)
    assert [r.ok for r in reports] == [True, True], "\n".join(r.text() for r in reports)
    for report, step in zip(reports, (0, 1), strict=True):
        assert len(report.notes) == 1
        assert f"step {step} lives only on the Hub" in report.notes[0]
        assert "hf://datasets/neox/gone" in report.notes[0]
    verified = CliRunner().invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert "note: step 1 lives only on the Hub" in verified.output

    archive = open_archive(out)
    weight = archive.tensor(1, DENSE)
    row = [r for r in archive.index.to_table().to_pylist()
           if r["step"] == 1 and r["name"] == DENSE and r["kind"] == "model"][0]
    data = weight.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert blake3.blake3(data).hexdigest() == row["digest"]
    masters = archive.state_dict(1, kind="master")
    assert masters[DENSE].shape == weight.shape
    assert (archive.model_path(1) / "model.safetensors").is_file()
