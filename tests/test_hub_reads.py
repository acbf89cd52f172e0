"""Reading a published archive from the Hub: only the bytes asked for, checked, cached, pinned.

The archive is seeded into the test Hub server as it would be pushed; the real huggingface_hub
client reads it, and the server counts every byte of file content it sends.
"""

from __future__ import annotations

import doctest
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pyarrow.dataset as ds
import pytest
import torch
from hubserver import HubServer

from exporter import open_archive
from exporter.archive.cache import TensorCache
from exporter.archive.digest import digest_key
from exporter.archive.loader import Archive
from exporter.archive.remote import HubLocation, HubReader
from exporter.errors import ArchiveError, IntegrityError
from exporter.hub.calls import RetryPolicy
from exporter.hub.push import push_archive
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

STEPS = (0, 1, 2, 4, 8)
REPO = "neox/tiny"
URI = f"hf://datasets/{REPO}"
DENSE = "gpt_neox.layers.0.attention.dense.weight"
NO_WAIT = RetryPolicy(attempts=4, base_delay=0)
FILES = r"/resolve/[0-9a-f]{40}/steps/"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_run(run, TINY, steps=STEPS, dp=2, config=tiny_run_config(STEPS[-1]))
    out = tmp_path_factory.mktemp("built") / "archive"
    build(LocalSource(run), out, BuildOptions(
        quiet=True, export=ExportOptions(include=("model", "optimizer", "state"))))
    return out


@pytest.fixture
def hub(hub_server: HubServer, archive: Path) -> Iterator[HubServer]:
    """The server holding the archive as the dataset ``neox/tiny`` (main), no request logged."""
    hub_server.seed_repo(REPO, archive, repo_type="dataset", message="Add steps")
    hub_server.clear_requests()
    yield hub_server
    assert hub_server.internal_errors == []


def open_hub(cache: Path, location: str = URI, **options: object) -> Archive:
    return open_archive(location, cache_dir=cache, retry=NO_WAIT, **options)  # type: ignore[arg-type]


def index_bytes(archive: Path) -> int:
    """What opening and querying downloads: the manifest and every index shard."""
    paths = [archive / "manifest.json", *(archive / "index").rglob("*.parquet")]
    return sum(p.stat().st_size for p in paths)


def rows_of(archive: Path, name: str, kind: str) -> list[dict[str, object]]:
    table = open_archive(archive).index.to_table(
        filter=(ds.field("name") == name) & (ds.field("kind") == kind))
    return sorted(table.to_pylist(), key=lambda r: r["step"])  # type: ignore[arg-type, return-value]


def test_one_tensor_of_every_step_costs_its_bytes_plus_the_index(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    pushed = Path(shutil.copytree(archive, tmp_path / "pushed"))  # push writes the card in it
    push_archive(pushed, "neox/pushed", steps_per_commit=2, retry=NO_WAIT)
    hub.clear_requests()
    rows = rows_of(archive, DENSE, "exp_avg")
    distinct = {r["digest"]: r for r in rows}.values()  # equal bytes are read once, by digest
    tensor_bytes = sum(int(r["data_offset_end"]) - int(r["data_offset_begin"]) for r in distinct)
    local = open_archive(archive)

    remote = open_hub(tmp_path / "cache", "hf://datasets/neox/pushed")
    got = {step: remote.tensor(step, DENSE, kind="exp_avg") for step in remote.steps}

    assert all(torch.equal(got[s], local.tensor(s, DENSE, kind="exp_avg")) for s in STEPS)
    sent = hub.bytes_sent("GET", r"/resolve/")
    assert hub.bytes_sent("GET", FILES) == tensor_bytes  # exactly the ranges, nothing more
    assert sent <= 1.1 * tensor_bytes + index_bytes(archive)
    assert hub.count_requests("GET", FILES) == len(distinct) > 1
    assert all(r.headers.get("range") for r in hub.requests if "/steps/" in r.path)


def test_a_second_read_transfers_nothing_and_works_offline(
    hub: HubServer, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = open_hub(tmp_path / "cache")
    first = [t for _, t in remote.trajectory(DENSE, kind="exp_avg")]
    hub.clear_requests()

    again = [t for _, t in remote.trajectory(DENSE, kind="exp_avg")]
    pinned = open_hub(tmp_path / "cache", f"{URI}@{remote.revision}")
    pinned_read = [t for _, t in pinned.trajectory(DENSE, kind="exp_avg")]

    assert hub.requests == []  # by commit: manifest and index come from the HF cache too
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    offline = open_hub(tmp_path / "cache")  # the branch resolves to the commit read online
    offline_read = [t for _, t in offline.trajectory(DENSE, kind="exp_avg")]
    assert offline.revision == remote.revision
    assert hub.requests == []
    for tensors in (again, pinned_read, offline_read):
        assert all(torch.equal(a, b) for a, b in zip(first, tensors, strict=True))
    with pytest.raises(ArchiveError, match="not in the local cache.*HF_HUB_OFFLINE"):
        offline.tensor(8, DENSE, kind="master")


def test_a_damaged_cache_entry_is_read_anew_not_returned(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    [row] = [r for r in rows_of(archive, DENSE, "master") if r["step"] == 4]
    remote = open_hub(tmp_path / "cache")
    expected = remote.tensor(4, DENSE, kind="master")
    entry = TensorCache(tmp_path / "cache").path(digest_key(row))
    damaged = bytearray(entry.read_bytes())
    damaged[0] ^= 0xFF
    entry.write_bytes(bytes(damaged))
    hub.clear_requests()

    again = remote.tensor(4, DENSE, kind="master")

    assert torch.equal(again, expected)
    assert hub.count_requests("GET", FILES) == 1
    assert entry.read_bytes() == expected.numpy().tobytes()


def test_trajectory_and_stats_are_the_same_on_a_folder_and_the_hub(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    local, remote = open_archive(archive), open_hub(tmp_path / "cache")

    table = remote.stats("layers.*.attention.dense.weight", stat=["l2", "absmax"])

    assert hub.bytes_sent("GET", FILES) == 0  # statistics come from the index alone
    assert table.equals(local.stats("layers.*.attention.dense.weight", stat=["l2", "absmax"]))
    assert table.column_names == ["step", "name", "layer", "l2", "absmax"]
    assert table.num_rows == len(STEPS) * TINY.num_layers
    expected = {(r["step"], r["name"]): r["l2"] for r in local.index.to_table(
        filter=ds.field("kind") == "model").to_pylist() if r["name"].endswith("attention.dense.weight")}
    assert dict(zip(zip(table["step"].to_pylist(), table["name"].to_pylist(), strict=True),
                    table["l2"].to_pylist(), strict=True)) == expected
    for kind in ("model", "master", "exp_avg_sq"):
        mine = list(local.trajectory("layers.1.mlp.dense_4h_to_h.weight", kind, steps=[8, 0, 2]))
        theirs = list(remote.trajectory("layers.1.mlp.dense_4h_to_h.weight", kind, steps=[8, 0, 2]))
        assert [s for s, _ in theirs] == [s for s, _ in mine] == [0, 2, 8]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(mine, theirs, strict=True)), kind
    steps, stacked = remote.trajectory(DENSE, stack=True)
    local_steps, local_stacked = local.trajectory(DENSE, stack=True)
    assert steps == local_steps == list(STEPS) and torch.equal(stacked, local_stacked)


def test_trajectory_names_one_tensor_and_stack_keeps_to_its_budget(archive: Path) -> None:
    local = open_archive(archive)

    with pytest.raises(ArchiveError, match=r"matches 2 \("):
        local.trajectory("layers.*.attention.dense.weight")
    with pytest.raises(ArchiveError, match="matches 0"):
        local.trajectory("layers.9.nothing")
    with pytest.raises(ArchiveError, match="over the memory budget"):
        local.trajectory(DENSE, stack=True, memory_budget=1000)
    with pytest.raises(ArchiveError, match="no step 3"):
        local.trajectory(DENSE, steps=[3])
    with pytest.raises(ArchiveError, match="unknown statistic 'median'"):
        local.stats(DENSE, stat="median")


def test_a_corrupted_byte_on_the_server_is_an_error_naming_the_tensor(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    [row] = [r for r in rows_of(archive, DENSE, "model") if r["step"] == 8]
    entry = hub.list_files(REPO, repo_type="dataset")[str(row["file"])]
    stored = hub.store.object_path(entry.sha256)
    data = bytearray(stored.read_bytes())
    data[int(row["data_offset_begin"]) + 5] ^= 0x01
    stored.write_bytes(bytes(data))
    cache = TensorCache(tmp_path / "cache")
    remote = open_hub(tmp_path / "cache")

    with pytest.raises(IntegrityError, match=rf"model tensor '{DENSE}' of step 8 .*(blake3|sha256)"):
        remote.tensor(8, DENSE)
    with pytest.raises(IntegrityError, match=DENSE):
        remote.state_dict(8)  # coalesced with its neighbours, still caught and named

    assert cache.get(digest_key(row)) is None
    assert torch.equal(remote.tensor(4, DENSE), open_archive(archive).tensor(4, DENSE))


def test_server_errors_and_connection_resets_are_retried(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    remote = open_hub(tmp_path / "cache")
    unavailable = hub.inject(method="GET", path_regex=FILES, status=503, times=2)
    reset = hub.inject_drop(FILES, after_bytes=100, reset=True, method="GET")

    got = remote.state_dict(8, kind="master")

    expected = open_archive(archive).state_dict(8, kind="master")
    assert unavailable.fired == 2 and reset.fired == 1
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_errors_past_the_retry_budget_name_the_tensor(hub: HubServer, tmp_path: Path) -> None:
    remote = open_hub(tmp_path / "cache")
    hub.inject(method="GET", path_regex=FILES, status=503, times=None)

    with pytest.raises(ArchiveError, match=rf"{DENSE}.*HTTP 503 \(gave up after 4 attempts\)"):
        remote.tensor(8, DENSE)


def test_a_short_range_or_another_revision_is_an_error_never_a_tensor(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    remote = open_hub(tmp_path / "cache")
    short = hub.inject_short_range(FILES, keep=10)
    with pytest.raises(IntegrityError, match=rf"{DENSE}.*10 usable bytes came back .*2048 were asked"):
        remote.tensor(8, DENSE)
    other = hub.inject_headers(FILES, {"X-Repo-Commit": "f" * 40})
    with pytest.raises(IntegrityError, match=rf"{DENSE}.*served from commit f{{40}}"):
        remote.tensor(8, DENSE)

    assert short.fired == other.fired == 1
    assert [p for a in ("blake3", "sha256") for p in (tmp_path / "cache").glob(f"{a}/*/*")] == []
    assert torch.equal(remote.tensor(8, DENSE), open_archive(archive).tensor(8, DENSE))


def test_an_open_archive_keeps_reading_the_commit_it_resolved(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    remote = open_hub(tmp_path / "cache")
    first = remote.revision
    replaced = {row["file"]: bytes(64) for row in rows_of(archive, DENSE, "model")}
    later = hub.seed_repo(REPO, replaced, repo_type="dataset", message="Overwrite model files")

    got = remote.tensor(8, DENSE)

    assert first == hub.commits(REPO, repo_type="dataset")[1].oid and later != first
    assert torch.equal(got, open_archive(archive).tensor(8, DENSE))
    assert all(f"/resolve/{first}/" in r.path for r in hub.requests if "/steps/" in r.path)
    assert open_hub(tmp_path / "cache").revision == later
    assert open_hub(tmp_path / "cache", f"{URI}@{first}").revision == first
    with pytest.raises(ArchiveError, match="revision 'a' in the URI, 'b' asked for"):
        open_archive(f"{URI}@a", revision="b")


def test_adjacent_tensors_of_a_file_share_one_request(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    remote = open_hub(tmp_path / "cache", concurrency=3)
    expected = open_archive(archive).state_dict(4)

    got = remote.state_dict(4)

    assert hub.count_requests("GET", FILES) == 1
    assert hub.bytes_sent("GET", FILES) == (archive / "steps/step4/model.safetensors").stat().st_size \
        - min(r["data_offset_begin"] for r in open_archive(archive).index.to_table(
            filter=(ds.field("step") == 4) & (ds.field("kind") == "model")).to_pylist())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_large_tensor_is_read_in_pieces_and_a_reset_repeats_one_piece(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    [row] = [r for r in rows_of(archive, DENSE, "master") if r["step"] == 8]
    size = int(row["data_offset_end"]) - int(row["data_offset_begin"])
    reader = HubReader(HubLocation(REPO), cache=TensorCache(tmp_path / "cache"),
                       retry_policy=NO_WAIT, max_request_bytes=1000)
    hub.clear_requests()
    reset = hub.inject_drop(FILES, after_bytes=10, reset=True, method="GET")

    found = reader.fetch([row])

    pieces = -(-size // 1000)
    assert reset.fired == 1 and size > 2000
    assert hub.count_requests("GET", FILES) == pieces + 1
    assert hub.bytes_sent("GET", FILES) == size + 10
    expected = open_archive(archive).tensor(8, DENSE, kind="master")
    assert bytes(found[digest_key(row)]) == expected.numpy().tobytes()


def test_downloaded_steps_are_memory_mapped_not_range_read(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    remote = open_hub(tmp_path / "cache")

    paths = remote.download(steps=[8], kinds=["model", "master"])
    hub.clear_requests()
    tensor = remote.tensor(8, DENSE, kind="master")

    assert sorted(p.name for p in paths) == ["master.safetensors", "model.safetensors"]
    assert hub.requests == []
    assert torch.equal(tensor, open_archive(archive).tensor(8, DENSE, kind="master"))
    [master] = [p for p in paths if p.name == "master.safetensors"]
    assert hashlib.sha256(master.read_bytes()).hexdigest() == hashlib.sha256(
        (archive / "steps/step8/optimizer/master.safetensors").read_bytes()).hexdigest()


def test_the_index_is_a_dataset_that_filters_by_step_kind_and_name(
    hub: HubServer, archive: Path, tmp_path: Path
) -> None:
    remote = open_hub(tmp_path / "cache")

    rows = remote.index.to_table(filter=(ds.field("step") == 2) & (ds.field("kind") == "master")
                                 & (ds.field("name") == DENSE), columns=["digest"]).to_pylist()

    assert isinstance(remote.index, ds.Dataset)
    assert rows == [{"digest": r["digest"]} for r in rows_of(archive, DENSE, "master")
                    if r["step"] == 2]
    assert remote.index.to_table().equals(open_archive(archive).index.to_table())


def test_docstring_examples_of_the_read_modules_run() -> None:
    from exporter.archive import cache, digest, query, remote, tensorfile

    runner = doctest.DocTestRunner()
    for module in (cache, digest, query, remote, tensorfile):
        for test in doctest.DocTestFinder().find(module):
            runner.run(test)

    assert runner.tries >= 10 and runner.failures == 0
