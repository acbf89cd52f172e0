"""Partition files rebuilt from one read before, or sent by the forked reader, keep their long
lists of tensor records as rows (``exporter.torchfile.runs``): the plan, the rendering and the
records made from them are those of the files read in full."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.errors import LayoutError
from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.zero import _param_shapes, load_partition_files
from exporter.neox.zero.elastic import read_elastic
from exporter.neox.zero.gather import columns_of
from exporter.neox.zero.render import render_partition_file
from exporter.samples import TINY, RunConfig, write_checkpoint
from exporter.torchfile import load_torch_file
from exporter.torchfile.forked import ForkedLoads
from exporter.torchfile.runs import RecordRun
from tests.test_forked_loads import in_a_fresh_process


def _paths(tmp_path: Path, dp: int = 3) -> list[Path]:
    # 521 comm intervals of group 0 per rank: lists long enough to be left as runs.
    write_checkpoint(tmp_path, TINY, step=8, dp=dp, config=RunConfig(max_elements_per_comm=64))
    files = scan_checkpoint(tmp_path)
    return [files.optim_files[(r, 0)] for r in range(dp)]


def _plan(tfs: list) -> list[tuple[str, str, bytes, bytes]]:
    """Every parameter's kinds, read whole and read in chunks of 100 bytes."""
    shapes = _param_shapes(tfs[0].obj["param_shapes"], str(tfs[0].path))
    params, _ = read_elastic(shapes, tfs, None)
    out = []
    for p in params:
        for kind in p.segments:
            chunked = b"".join(c.tobytes() for c in p.chunks(kind)(100))
            out.append((p.name, kind, p.read(kind).tobytes(), chunked))
    return out


def _records(tf) -> list[tuple]:
    return [(path, ref.storage.key, str(ref.dtype), ref.storage.file_offset, ref.offset, ref.shape,
             ref.stride, ref.numel, ref.requires_grad) for path, ref in tf.tensors()]


def _runs(tf) -> list[RecordRun]:
    osd = tf.obj["optimizer_state_dict"]
    groups = [*osd["local_sub_partitions_of_fp32_groups"], *osd["base_optimizer_state"]]
    return [g for g in groups if type(g) is RecordRun]


def test_rebuilt_files_keep_runs_and_plan_as_files_read_in_full(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    plain = [load_torch_file(p) for p in paths]
    loaded = load_partition_files(paths)
    # One is read in full; the others are rebuilt from it, their long lists left as rows.
    assert sorted(len(_runs(tf)) for tf in loaded) == [0, 2, 2]
    want = _plan(plain)
    assert _plan(loaded) == want and len(want) > 10
    # Their records, made from the rows, are those read in full.
    for tf, read in zip(loaded, plain, strict=True):
        assert _records(tf) == _records(read)
        assert _runs(tf) == []


def test_a_run_makes_each_record_once_and_gives_its_columns(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    tfs = load_partition_files(paths)
    master, states = next(_runs(tf) for tf in tfs if _runs(tf))
    single = master[7]
    assert master[-1] is master[len(master) - 1]
    records = master.records()
    assert records[7] is single and len(records) == len(master) == 521
    # A list of dicts: each key's records, as a run of their own, and each dict made alike.
    assert states[3] == {"exp_avg": states.under("exp_avg")[3], "exp_avg_sq": states.under("exp_avg_sq")[3]}
    assert states.under("step") is None
    for run in (master, states.under("exp_avg"), states.under("exp_avg_sq")):
        got, want = run.columns(), columns_of(run.records())
        assert len(got) == len(want) == 7
        for a, b in zip(got, want, strict=True):
            assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b)
    assert states.columns() is None  # dicts: taken key by key


def test_a_file_with_runs_renders_as_one_read_in_full(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    plain = [load_torch_file(p) for p in paths]
    loaded = load_partition_files(paths)
    rebuilt = next(i for i, tf in enumerate(loaded) if _runs(tf))
    for everything in (False, True):
        assert (render_partition_file(loaded[rebuilt], everything)
                == render_partition_file(plain[rebuilt], everything))


@in_a_fresh_process
def test_files_the_forked_reader_sent_keep_runs_and_plan_alike(tmp_path: Path) -> None:
    paths = _paths(tmp_path, dp=4)
    plain = [load_torch_file(p) for p in paths]
    forked = ForkedLoads.start(paths, child_first=[3])
    assert forked is not None
    try:
        loaded = load_partition_files(paths, forked)
    finally:
        forked.close()
    assert _runs(loaded[3])  # the child's: sent as rows
    assert _plan(loaded) == _plan(plain)


def _with_paddings(tfs: list) -> None:
    """Give every file the ``group_paddings`` DeeperSpeed saves: per comm interval, what its
    sub-partition was cut short of the common size."""
    for tf in tfs:
        osd = tf.obj["optimizer_state_dict"]
        osd["group_paddings"] = [
            [max(r.numel for r in group) - ref.numel for ref in group]
            for group in osd["local_sub_partitions_of_fp32_groups"]]


def test_paddings_that_do_not_add_up_are_refused(tmp_path: Path) -> None:
    tfs = [load_torch_file(p) for p in _paths(tmp_path)]
    _with_paddings(tfs)
    want = _plan(tfs)
    tfs[1].obj["optimizer_state_dict"]["group_paddings"][0][5] += 1
    with pytest.raises(LayoutError, match="sub-partitions and paddings do not add up"):
        _plan(tfs)
    tfs[1].obj["optimizer_state_dict"]["group_paddings"][0][5] = "many"
    with pytest.raises(LayoutError, match="group 0 paddings are not whole numbers"):
        _plan(tfs)
    # Paddings of another length than any layout: not checked, as before.
    tfs[1].obj["optimizer_state_dict"]["group_paddings"][0] = [0]
    assert _plan(tfs) == want
