"""Partition files rendered for ``state.json``: long lists of tensor records grouped into runs
before they are rendered give what rendering every record and then grouping gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.errors import CheckpointFormatError
from exporter.neox.zero import render
from exporter.neox.zero.render import as_runs, render_partition_file
from exporter.torchfile import TorchFile, load_torch_file, to_json


def _records(tmp_path: Path) -> list[Any]:
    """Tensor records of a few sizes and two dtypes, from a file torch saved."""
    torch.save([torch.zeros(n % 4, dtype=torch.float32 if n % 7 else torch.float16)
                for n in range(400)], tmp_path / "r.pt")
    return load_torch_file(tmp_path / "r.pt").obj


def _rendered_item_by_item(obj: Any) -> Any:
    seen: dict[Any, Any] = {}

    def tensor(ref: Any) -> Any:
        return seen.setdefault((ref.dtype, ref.numel), {
            "__partition__": str(ref.dtype).removeprefix("torch."), "numel": ref.numel})

    return as_runs(to_json(obj, tensor=tensor))


def test_grouped_lists_render_as_every_record_would(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    refs = _records(tmp_path)
    same = [r for r in refs if r.numel == 2 and r.dtype == torch.float32]
    shared = [same[0]] * 40 + [same[1]] * 40
    tree = {
        "steady": [same[0]] * 30 + [same[1]] * 30 + [refs[3]] * 12,  # runs
        "varied": refs[:60],                                         # kept whole
        "moments": [{"exp_avg": same[0], "exp_avg_sq": same[1]} for _ in range(20)]
        + [{"exp_avg_sq": same[1], "exp_avg": same[0]}] * 5           # key order aside: equal
        + [{"exp_avg": refs[5], "exp_avg_sq": refs[6]}] * 9,
        "mixed": [same[0]] * 20 + [3] * 20,
        "not_str_keys": [{1: same[0]}] * 20,
        "nested": [[same[0]] * 16, [same[1]] * 16, {"deep": [refs[2]] * 40}],
        "twice": [shared, shared],
        "short": [same[0]] * 7,
    }
    tf = TorchFile(tmp_path / "r.pt", tree, {})
    given: list[Any] = []

    def recording(obj: Any, **kwargs: Any) -> Any:
        given.append(obj)
        return to_json(obj, **kwargs)

    monkeypatch.setattr(render, "to_json", recording)
    got = render_partition_file(tf, True)
    assert got == _rendered_item_by_item(tree)
    # Grouped before rendering: each run's first record is all that is rendered of it.
    assert given[0]["steady"] == {"__runs__": [[60, same[0]], [12, refs[3]]]}  # one rendering: one run
    assert "__runs__" in got["steady"] and "__runs__" in got["moments"]
    assert got["moments"]["__runs__"][0][0] == 25
    assert isinstance(got["varied"], list) and isinstance(got["short"], list)


def test_a_cycle_is_refused_as_before(tmp_path: Path) -> None:
    refs = _records(tmp_path)
    loop: list[Any] = [refs[1]] * 10
    loop.append(loop)
    tf = TorchFile(tmp_path / "r.pt", {"loop": loop}, {})
    with pytest.raises(CheckpointFormatError, match="cycle"):
        _rendered_item_by_item(tf.obj)
    with pytest.raises(CheckpointFormatError, match="cycle"):
        render_partition_file(tf, True)
