"""The library's face: one function per job, exported from ``exporter``, each with an example
that runs."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import exporter
from exporter.pipeline import export, run
from exporter.samples import TINY, tiny_run_config, write_run


def test_every_public_name_resolves() -> None:
    for name in exporter.__all__:
        assert getattr(exporter, name) is not None, name
    with pytest.raises(AttributeError):
        exporter.no_such_function  # noqa: B018


def test_write_side_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.verify as verify

    write_run(tmp_path / "runs" / "tiny", TINY, steps=[0, 8], dp=2, config=tiny_run_config(8))
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    finder = doctest.DocTestFinder()
    for function in (export.export_checkpoint, run.build, verify.verify_path):
        for test in finder.find(function, globs=vars(__import__(function.__module__, fromlist=["x"]))):
            runner.run(test)
    assert runner.tries >= 10 and runner.failures == 0
    assert (tmp_path / "archive" / "manifest.json").is_file()
