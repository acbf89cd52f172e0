"""A build that resumes and finds a complete step its manifest lacks (a build stopped between
writing the step's index and its manifest entry) records the step's real figures."""

from __future__ import annotations

import json
from pathlib import Path

from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource


def test_resume_records_a_complete_step_missing_from_the_manifest_with_its_figures(tmp_path: Path) -> None:
    write_run(tmp_path / "run", TINY, steps=(0, 1), dp=2, config=tiny_run_config(1))
    out = tmp_path / "a"
    build(LocalSource(tmp_path / "run"), out, BuildOptions(quiet=True))
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["steps"]["1"]
    assert recorded["tensors"] > 0 and recorded["bytes_out"] > 0 and recorded["files"] > 0
    del manifest["steps"]["1"]
    (out / "manifest.json").write_text(json.dumps(manifest))

    again = build(LocalSource(tmp_path / "run"), out, BuildOptions(quiet=True))
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"]
    assert json.loads((out / "manifest.json").read_text())["steps"]["1"] == recorded
