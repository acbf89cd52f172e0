"""Each partition file's share of an elastic plan, derived as the file is read
(``prepare_file``), gives the plan derived after the last file, and is used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.errors import LayoutError
from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.zero import elastic, gather, load_partition_files
from exporter.neox.zero.elastic import prepare_file, read_elastic
from exporter.samples import TINY, RunConfig, write_checkpoint
from exporter.torchfile import load_torch_file


def _partition_files(tmp_path: Path) -> list[Path]:
    write_checkpoint(tmp_path, TINY, step=8, dp=3, config=RunConfig(max_elements_per_comm=64))
    files = scan_checkpoint(tmp_path)
    return [files.optim_files[(r, 0)] for r in range(3)]


def _plan(tfs: list, param_shapes: list) -> list[tuple[str, str, bytes]]:
    params, _ = read_elastic(param_shapes, tfs, None)
    return [(p.name, kind, p.read(kind).tobytes()) for p in params for kind in p.segments]


def _shapes(tf) -> list:
    from exporter.neox.zero import _param_shapes

    return _param_shapes(tf.obj["param_shapes"], str(tf.path))


def test_a_prepared_plan_equals_one_made_after_the_last_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _partition_files(tmp_path)
    plain = [load_torch_file(p) for p in paths]
    prepared = load_partition_files(paths)
    assert all("elastic" in tf.derived for tf in prepared)
    assert not any(tf.derived for tf in plain)
    made: list[int] = []
    columns_of = gather.columns_of
    monkeypatch.setattr(gather, "columns_of", lambda refs: made.append(len(refs)) or columns_of(refs))
    want = _plan(plain, _shapes(plain[0]))
    made_plain = len(made)
    made.clear()
    got = _plan(prepared, _shapes(prepared[0]))
    assert got == want and len(got) > 10
    # Planned from the prepared columns: none made after the last file.
    assert made_plain > 0 and made == []


def test_a_file_prepared_from_another_tree_is_not_taken_for_this_one(tmp_path: Path) -> None:
    paths = _partition_files(tmp_path)
    tfs = [load_torch_file(p) for p in paths]
    prepare_file(tfs[0])
    tfs[1].derived["elastic"] = tfs[0].derived["elastic"]  # rank 0's lists, on rank 1
    got = _plan(tfs, _shapes(tfs[0]))
    want = _plan([load_torch_file(p) for p in paths], _shapes(tfs[0]))
    assert got == want


def test_a_malformed_file_is_not_prepared_and_the_plan_names_it(tmp_path: Path) -> None:
    paths = _partition_files(tmp_path)
    tfs = [load_torch_file(p) for p in paths]
    osd = tfs[1].obj["optimizer_state_dict"]
    osd["base_optimizer_state"][0][3] = {"exp_avg": osd["base_optimizer_state"][0][3]["exp_avg"]}
    for tf in tfs:
        prepare_file(tf)
    assert "elastic" in tfs[0].derived and "elastic" not in tfs[1].derived
    with pytest.raises(LayoutError, match="exp_avg_sq"):
        read_elastic(_shapes(tfs[0]), tfs, None)


def test_a_file_of_another_layout_is_left_alone(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY, step=8, dp=2)
    files = scan_checkpoint(tmp_path)
    model = load_torch_file(files.mp_files[0])
    prepare_file(model)
    assert model.derived == {}
    # Sub-partition k is rank k % dp's interval k // dp: the ranks' sizes taken in turns.
    made = [(None,) * 6 + (np.array([1, 3]),), (None,) * 6 + (np.array([2, 4]),)]
    assert elastic._sizes_in_turns([[0, 0], [0, 0]], made).tolist() == [1, 2, 3, 4]
