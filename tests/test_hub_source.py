"""HubSource: step branches of a Hub model repository, through the real huggingface_hub client.

Every test runs against the local Hub server (``hub_server`` fixture) seeded with a tiny
Pythia-era run written by ``exporter.samples``, one branch per step as in
``EleutherAI/neox-ckpt-pythia-*``.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pyarrow.parquet as pq
import pytest
from hubserver import HubServer
from hubserver.wire import FileSlice
from huggingface_hub import HfApi

import exporter.pipeline.step
from exporter.errors import ExporterError, SourceError
from exporter.files import file_sha256
from exporter.hub.calls import RetryPolicy, retry
from exporter.hub.source import HubSource
from exporter.pipeline.disk import MARGIN
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, write_run
from exporter.sources import LocalSource, open_source

REPO = "EleutherAI/neox-ckpt-pythia-tiny"
URI = f"hf://{REPO}"
STEPS = (0, 1, 2, 4, 8)
LAYER_FILE = "layer_02-model_00-model_states.pt"
INCLUDE = ("model", "state")  # enough wherever only the fetching matters


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny run: ``step{N}/`` folders holding layer, engine, optimizer files and yml."""
    root = tmp_path_factory.mktemp("run")
    write_run(root, TINY, steps=STEPS, dp=2)
    return root


@pytest.fixture
def repo(hub_server: HubServer, run: Path) -> dict[int, str]:
    """The run on the Hub, one branch per step; step -> commit id of its branch."""
    return {
        step: hub_server.seed_repo(REPO, run / f"step{step}", branch=f"step{step}")
        for step in STEPS
    }


def hub_source(tmp_path: Path, **options: Any) -> HubSource:
    options.setdefault("retry", RetryPolicy(attempts=5, base_delay=0.01))
    return HubSource(URI, tmp_path / "downloads", **options)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file below ``folder``; files renamed or removed meanwhile are skipped."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def files_below(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def canonical(value: Any) -> str:
    """A comparable form of index rows (NaN statistics compare equal as text)."""
    return json.dumps(value, sort_keys=True, default=str)


def serve_wrong_bytes(
    server: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    path: str,
    times: int | None,
) -> list[str]:
    """Answer the next ``times`` GETs of ``path`` (None: all) with the right length, wrong bytes.

    Wraps the test server's file responder; returns a list that grows by one per corrupted GET.
    """
    api = server._api  # the server's request router, built around the same object store
    original = api._file_response
    served: list[str] = []

    def corrupting(request: Any, entry: Any, commit_oid: str) -> Any:
        response = original(request, entry, commit_oid)
        wanted = times is None or len(served) < times
        if request.method == "GET" and entry.path == path and wanted:
            good = server.store.read_object(entry.sha256)
            bad = tmp_path / f"wrong-{entry.sha256}"
            bad.write_bytes(bytes(byte ^ 0xFF for byte in good))
            response.body = FileSlice(bad, response.body.offset, response.body.length)
            served.append(entry.path)
        return response

    monkeypatch.setattr(api, "_file_response", corrupting)
    return served


# -- listing ---------------------------------------------------------------------------------


def test_steps_are_the_step_branches_in_numeric_order(
    hub_server: HubServer, run: Path, tmp_path: Path
) -> None:
    for step in (10, 2, 0):
        hub_server.seed_repo(REPO, run / "step0", branch=f"step{step}")
    hub_server.seed_repo(REPO, run / "step1", branch="global_step7")
    hub_server.create_branch(REPO, "docs")

    source = hub_source(tmp_path)

    assert source.steps() == [0, 2, 7, 10]
    assert source.branch(7).name == "global_step7"
    assert source.branch(7).commit == hub_server.head(REPO, revision="global_step7")


def test_two_branches_for_one_step_are_refused(
    hub_server: HubServer, run: Path, tmp_path: Path
) -> None:
    hub_server.seed_repo(REPO, run / "step1", branch="step1")
    hub_server.seed_repo(REPO, run / "step1", branch="global_step1")

    with pytest.raises(SourceError, match=r"step 1 has two branches"):
        hub_source(tmp_path).steps()


def test_step_bytes_and_files_come_from_the_listing_without_downloading(
    hub_server: HubServer, repo: dict[int, str], run: Path, tmp_path: Path
) -> None:
    source = hub_source(tmp_path)
    local = files_below(run / "step4")

    assert source.step_bytes(4) == sum(local.values())
    assert {f.path: f.size for f in source.files(4)} == local  # .gitattributes left out
    assert hub_server.count_requests(path_regex="/resolve/") == 0


def test_a_missing_repository_is_a_source_error(hub_server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"repository EleutherAI/nothing-here not found"):
        HubSource("hf://EleutherAI/nothing-here", tmp_path).steps()


@pytest.mark.parametrize("uri", ["hf://just-a-name", "hf://org/name@", "hf://org/name/path", "s3://org/name"])
def test_a_malformed_uri_is_a_source_error(uri: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="hf://ORG/NAME"):
        HubSource(uri, tmp_path)


def test_open_source_gives_a_hub_source_for_hf_uris(tmp_path: Path) -> None:
    source = open_source(URI, download_dir=tmp_path)
    assert isinstance(source, HubSource)
    assert (source.uri, source.repo_id, source.repo_type) == (URI, REPO, "model")


# -- fetching --------------------------------------------------------------------------------


def test_fetch_yields_the_branch_files_verified_and_removes_them_on_exit(
    hub_server: HubServer, repo: dict[int, str], run: Path, tmp_path: Path
) -> None:
    source = hub_source(tmp_path)

    with source.fetch(2) as fetched:
        assert fetched.step == 2
        assert fetched.revision == repo[2]
        assert files_below(fetched.folder) == files_below(run / "step2")
        assert [(f.path, f.size, f.sha256) for f in fetched.files] == [
            (p.name, p.stat().st_size, file_sha256(p)) for p in sorted((run / "step2").iterdir())
        ]
        folder = fetched.folder

    assert not folder.exists()
    assert files_below(tmp_path / "downloads") == {}


def test_the_source_survives_pickling_for_worker_processes(
    hub_server: HubServer, repo: dict[int, str], run: Path, tmp_path: Path
) -> None:
    source = hub_source(tmp_path)
    source.steps()
    with source.fetch(0):
        pass  # the client now exists in this process

    copy = pickle.loads(pickle.dumps(source))

    assert copy.steps() == list(STEPS)
    with copy.fetch(1) as fetched:
        assert files_below(fetched.folder) == files_below(run / "step1")
    assert hub_server.count_requests("GET", r"/refs$") == 1  # the copy kept the branch list


def test_a_branch_that_moves_after_listing_is_read_at_the_listed_commit(
    hub_server: HubServer, repo: dict[int, str], run: Path, tmp_path: Path
) -> None:
    source = hub_source(tmp_path)
    source.steps()
    moved = hub_server.seed_repo(REPO, {"tiny.yml": b"rewritten: true\n"}, branch="step2")

    with source.fetch(2) as fetched:
        assert fetched.revision == repo[2] != moved
        assert files_below(fetched.folder) == files_below(run / "step2")
        assert file_sha256(fetched.folder / "tiny.yml") == file_sha256(run / "step2" / "tiny.yml")


def test_a_step_larger_than_max_disk_is_refused_before_any_download(
    hub_server: HubServer, repo: dict[int, str], run: Path, tmp_path: Path
) -> None:
    size = sum(files_below(run / "step4").values())
    source = hub_source(tmp_path, max_disk=size - 1)

    with pytest.raises(SourceError, match=rf"step 4 .*holds {size:,} bytes.*max_disk"):
        with source.fetch(4):
            pass
    assert hub_server.count_requests(path_regex="/resolve/") == 0

    with hub_source(tmp_path, max_disk=size).fetch(4) as fetched:
        assert len(fetched.files) == len(files_below(run / "step4"))


# -- builds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "include", [("model", "state"), ("model", "optimizer", "state")], ids=",".join
)
def test_a_build_from_the_hub_equals_a_build_from_the_same_local_checkpoints(
    include: tuple[str, ...],
    hub_server: HubServer,
    repo: dict[int, str],
    run: Path,
    tmp_path: Path,
) -> None:
    options = BuildOptions(export=ExportOptions(include=include), quiet=True)
    build(LocalSource(run), tmp_path / "local", options)
    summary = build(hub_source(tmp_path), tmp_path / "hub", options)

    assert [o.status for o in summary.outcomes] == ["done"] * len(STEPS)
    for step in STEPS:
        local_index = tmp_path / "local" / "index"
        hub_index = tmp_path / "hub" / "index"
        # Tensor rows: every column, every row.
        assert canonical(rows(hub_index / "tensors" / f"step{step}.parquet")) == canonical(
            rows(local_index / "tensors" / f"step{step}.parquet")
        )
        # Checkpoint rows: all but the wall time and the two columns naming the source.
        (hub_row,) = rows(hub_index / "checkpoints" / f"step{step}.parquet")
        (local_row,) = rows(local_index / "checkpoints" / f"step{step}.parquet")
        assert (hub_row["source"], hub_row["source_revision"]) == (URI, repo[step])
        assert (local_row["source"], local_row["source_revision"]) == (str(run), None)
        differing = {"seconds", "source", "source_revision"}
        assert canonical({k: v for k, v in hub_row.items() if k not in differing}) == canonical(
            {k: v for k, v in local_row.items() if k not in differing}
        )
        assert {f["path"] for f in hub_row["source_files"]} == set(files_below(run / f"step{step}"))
        # And the step folders, byte for byte.
        hub_files = files_below(tmp_path / "hub" / "steps" / f"step{step}")
        assert hub_files == files_below(tmp_path / "local" / "steps" / f"step{step}")
        for name in hub_files:
            assert file_sha256(tmp_path / "hub" / "steps" / f"step{step}" / name) == file_sha256(
                tmp_path / "local" / "steps" / f"step{step}" / name
            )


def test_a_hub_build_runs_in_worker_processes(
    hub_server: HubServer, repo: dict[int, str], tmp_path: Path
) -> None:
    summary = build(
        hub_source(tmp_path),
        tmp_path / "archive",
        BuildOptions(export=ExportOptions(include=INCLUDE), workers=2, quiet=True),
    )

    assert {o.step: (o.status, o.revision) for o in summary.outcomes} == {
        step: ("done", commit) for step, commit in repo.items()
    }


def test_a_hub_build_keeps_at_most_one_step_on_disk(
    hub_server: HubServer,
    repo: dict[int, str],
    run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    downloads = tmp_path / "downloads"
    on_export: list[dict[str, int]] = []
    export = exporter.pipeline.step.export_checkpoint

    def observed_export(folder: Path, *args: Any, **kwargs: Any) -> Any:
        on_export.append(files_below(downloads))
        return export(folder, *args, **kwargs)

    monkeypatch.setattr(exporter.pipeline.step, "export_checkpoint", observed_export)
    # A bound that holds one step (download + output + margin) but not two: the pipelined
    # build then fetches no step ahead of the one converting.
    largest = max(sum(files_below(run / f"step{step}").values()) for step in STEPS)
    max_disk = 2 * largest + MARGIN + largest // 2
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, folder_bytes(downloads))
            stop.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        build(
            hub_source(tmp_path),
            tmp_path / "archive",
            BuildOptions(export=ExportOptions(include=INCLUDE), quiet=True, max_disk=max_disk),
        )
    finally:
        stop.set()
        sampler.join()

    # While a step converts, the download folder holds that step's files and nothing else.
    assert on_export == [
        {f"step{step}/{name}": size for name, size in files_below(run / f"step{step}").items()}
        for step in STEPS
    ]
    # In between, at most one step's files plus the client's small metadata files.
    metadata_allowance = 1024 * len(files_below(run / "step0"))
    assert peak <= largest + metadata_allowance
    assert files_below(downloads) == {}


# -- integrity -------------------------------------------------------------------------------


def test_a_corrupted_download_is_detected_and_fetched_again(
    hub_server: HubServer,
    repo: dict[int, str],
    run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    corrupted = serve_wrong_bytes(hub_server, monkeypatch, tmp_path, LAYER_FILE, times=1)

    with hub_source(tmp_path).fetch(2) as fetched:
        assert file_sha256(fetched.folder / LAYER_FILE) == file_sha256(run / "step2" / LAYER_FILE)

    assert corrupted == [LAYER_FILE]
    assert hub_server.count_requests("GET", rf"/resolve/{repo[2]}/{LAYER_FILE}$") == 2


def test_a_file_that_stays_corrupted_fails_the_step_naming_the_file(
    hub_server: HubServer,
    repo: dict[int, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    corrupted = serve_wrong_bytes(hub_server, monkeypatch, tmp_path, LAYER_FILE, times=None)

    with pytest.raises(SourceError, match=rf"step 2 .*{LAYER_FILE}: sha256 .* does not match"):
        with hub_source(tmp_path).fetch(2):
            pass

    assert corrupted == [LAYER_FILE, LAYER_FILE]
    assert files_below(tmp_path / "downloads") == {}


def test_a_build_stops_at_a_corrupted_step_naming_the_file(
    hub_server: HubServer,
    repo: dict[int, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve_wrong_bytes(hub_server, monkeypatch, tmp_path, "mp_rank_00_model_states.pt", times=None)

    with pytest.raises(ExporterError, match=r"step 0: .*mp_rank_00_model_states\.pt"):
        build(
            hub_source(tmp_path),
            tmp_path / "archive",
            BuildOptions(export=ExportOptions(include=INCLUDE), quiet=True),
        )


# -- transient failures ----------------------------------------------------------------------


FAULTS = {
    "503 on a file GET": lambda s: s.inject(
        path_regex=rf"/resolve/.*/{LAYER_FILE}$", method="GET", status=503
    ),
    "connection reset mid-file": lambda s: s.inject_drop(
        rf"/resolve/.*/{LAYER_FILE}$", method="GET", after_bytes=1000, reset=True
    ),
    "connection reset before the body": lambda s: s.inject_drop(
        r"/resolve/.*/tiny\.yml$", method="GET", reset=True
    ),
    "502 on the branch listing": lambda s: s.inject(path_regex=r"/refs$", status=502),
    "connection reset on the branch listing": lambda s: s.inject_drop(r"/refs$", reset=True),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_transient_failures_are_retried(
    fault: str, hub_server: HubServer, repo: dict[int, str], run: Path, tmp_path: Path
) -> None:
    rule = FAULTS[fault](hub_server)
    source = hub_source(tmp_path)

    assert source.steps() == list(STEPS)
    with source.fetch(2) as fetched:
        assert [f.sha256 for f in fetched.files] == [
            file_sha256(p) for p in sorted((run / "step2").iterdir())
        ]
    assert rule.fired == 1


def test_a_failure_that_persists_gives_up_with_a_source_error(
    hub_server: HubServer, repo: dict[int, str], tmp_path: Path
) -> None:
    rule = hub_server.inject(path_regex=rf"/resolve/.*/{LAYER_FILE}$", method="GET", times=None)
    source = hub_source(tmp_path, retry=RetryPolicy(attempts=3, base_delay=0.01))

    with pytest.raises(SourceError, match=rf"download {LAYER_FILE} .*HTTP 503.*after 3 attempts"):
        with source.fetch(2):
            pass
    assert rule.fired == 3
    assert files_below(tmp_path / "downloads") == {}


def test_retry_waits_as_long_as_retry_after_asks(
    hub_server: HubServer, repo: dict[int, str]
) -> None:
    hub_server.inject(path_regex=r"/refs$", status=429, headers={"Retry-After": "7"})
    waits: list[float] = []

    refs = retry(lambda: HfApi().list_repo_refs(REPO), what="list branches", sleep=waits.append)

    assert waits == [7.0]
    assert {ref.name for ref in refs.branches} >= {f"step{step}" for step in STEPS}


def test_retry_does_not_repeat_a_permanent_error(hub_server: HubServer) -> None:
    rule = hub_server.inject(path_regex=r"/refs$", status=403)
    waits: list[float] = []

    with pytest.raises(Exception, match="403"):
        retry(lambda: HfApi().list_repo_refs(REPO), what="list branches", sleep=waits.append)
    assert (rule.fired, waits) == (1, [])


# -- offline ---------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, hub_server: HubServer) -> Iterator[None]:
    """HF_HUB_OFFLINE=1, as huggingface_hub reads it (at import, into ``constants``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield


def test_offline_mode_is_a_clear_error_before_any_request(
    offline: None, hub_server: HubServer, repo: dict[int, str], tmp_path: Path
) -> None:
    with pytest.raises(SourceError, match=r"offline mode \(HF_HUB_OFFLINE\).*prevents listing"):
        hub_source(tmp_path).steps()
    assert hub_server.requests == []
