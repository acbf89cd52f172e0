"""The local Hub server, specified through the real huggingface_hub 2.4 and datasets clients."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hubserver import HubServer
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

CKPT_REPO = "EleutherAI/neox-ckpt-pythia-tiny"
LAYER_FILE = "layer_00-model_00-model_states.pt"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_folder(root: Path, step: int) -> Path:
    """A stand-in for one raw checkpoint: two `.pt` files and a config."""
    folder = root / f"step{step}"
    folder.mkdir(parents=True)
    (folder / LAYER_FILE).write_bytes(os.urandom(4096) + bytes([step]))
    (folder / "mp_rank_00_model_states.pt").write_bytes(os.urandom(512) + bytes([step]))
    (folder / "tiny.yml").write_text(f"train_iters: {step}\n")
    return folder


@pytest.fixture
def ckpt_repo(hub_server: HubServer, tmp_path: Path) -> dict[str, Path]:
    """A model repo with one branch per step, each holding one checkpoint folder."""
    folders = {f"step{step}": checkpoint_folder(tmp_path / "ckpt", step) for step in (0, 1, 2)}
    for branch, folder in folders.items():
        hub_server.seed_repo(CKPT_REPO, folder, branch=branch, message=f"Add {branch}")
    return folders


def test_each_branch_serves_its_own_files_with_lfs_sha256_metadata(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    api = HfApi()
    for branch, folder in ckpt_repo.items():
        info = api.repo_info(CKPT_REPO, revision=branch, files_metadata=True)
        assert info.sha == hub_server.head(CKPT_REPO, revision=branch)
        siblings = {sibling.rfilename: sibling for sibling in info.siblings}
        assert siblings["tiny.yml"].lfs is None

        local = Path(hf_hub_download(CKPT_REPO, LAYER_FILE, revision=branch))
        expected = (folder / LAYER_FILE).read_bytes()
        assert local.read_bytes() == expected
        assert siblings[LAYER_FILE].lfs.sha256 == sha256(expected)
        assert siblings[LAYER_FILE].lfs.size == len(expected)
        # The cache folder is named after the X-Repo-Commit the server sent.
        assert local.parent.name == info.sha

        config = hf_hub_download(CKPT_REPO, "tiny.yml", revision=branch)
        assert Path(config).read_text() == (folder / "tiny.yml").read_text()


def test_file_metadata_carries_hub_headers_and_never_xet(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    url = hf_hub_url(CKPT_REPO, LAYER_FILE, revision="step1")
    content = (ckpt_repo["step1"] / LAYER_FILE).read_bytes()

    metadata = get_hf_file_metadata(url)
    raw = httpx2.head(url)

    assert metadata.commit_hash == hub_server.head(CKPT_REPO, revision="step1")
    assert metadata.etag == sha256(content)
    assert metadata.size == len(content)
    assert metadata.xet_file_data is None
    assert not [name for name in raw.headers if name.lower().startswith("x-xet")]
    assert "link" not in raw.headers


def test_a_child_process_inherits_the_endpoint_and_the_cache(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    code = (
        "from huggingface_hub import hf_hub_download;"
        f"print(hf_hub_download({CKPT_REPO!r}, 'tiny.yml', revision='step2'))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    local = Path(result.stdout.strip())
    assert local.read_text() == (ckpt_repo["step2"] / "tiny.yml").read_text()
    assert local.is_relative_to(os.environ["HF_HUB_CACHE"])
    assert hub_server.count_requests("GET", r"/resolve/step2/tiny\.yml$") == 1


def test_list_repo_refs_reports_every_branch_at_its_head(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    refs = HfApi().list_repo_refs(CKPT_REPO)

    heads = {ref.name: ref.target_commit for ref in refs.branches}
    assert set(heads) == {"main", *ckpt_repo}
    assert heads == hub_server.branches(CKPT_REPO)
    assert refs.tags == [] and refs.converts == []


def test_tree_listing_follows_pagination_and_reports_last_commits(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    hub_server.options.tree_page_size = 2
    hub_server.options.expanded_tree_page_size = 2
    api = HfApi()

    files = api.list_repo_files(CKPT_REPO, revision="step1")
    expanded = list(api.list_repo_tree(CKPT_REPO, revision="step1", expand=True))

    assert sorted(files) == sorted([".gitattributes", *os.listdir(ckpt_repo["step1"])])
    assert hub_server.count_requests("GET", r"/tree/step1") >= 4
    step1_commit = hub_server.head(CKPT_REPO, revision="step1")
    last_commits = {entry.path: entry.last_commit.oid for entry in expanded}
    assert last_commits["tiny.yml"] == step1_commit
    assert last_commits[".gitattributes"] == hub_server.commits(CKPT_REPO)[-1].oid


def test_paths_info_describes_existing_paths_and_skips_missing_ones(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    infos = HfApi().get_paths_info(CKPT_REPO, [LAYER_FILE, "absent.pt"], revision="step2")

    assert [info.path for info in infos] == [LAYER_FILE]
    assert infos[0].lfs.sha256 == sha256((ckpt_repo["step2"] / LAYER_FILE).read_bytes())


def test_missing_repo_revision_and_file_raise_the_hub_errors(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    with pytest.raises(RepositoryNotFoundError):
        HfApi().repo_info("EleutherAI/absent")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(CKPT_REPO, "tiny.yml", revision="step999")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(CKPT_REPO, "absent.yml", revision="step0")


def test_file_system_reads_a_byte_range(hub_server: HubServer, ckpt_repo: dict[str, Path]) -> None:
    expected = (ckpt_repo["step0"] / LAYER_FILE).read_bytes()

    with HfFileSystem().open(f"{CKPT_REPO}@step0/{LAYER_FILE}", "rb", block_size=64) as remote:
        remote.seek(100)
        chunk = remote.read(50)

    assert chunk == expected[100:150]
    ranged = [r for r in hub_server.requests if r.method == "GET" and "range" in r.headers]
    assert ranged and all(r.status == 206 for r in ranged)


def test_uploads_round_trip_and_each_commit_counts_once(
    hub_server: HubServer, tmp_path: Path
) -> None:
    api = HfApi()
    repo = "neox/archive"
    api.create_repo(repo, repo_type="dataset")
    folder = tmp_path / "archive"
    (folder / "index" / "tensors").mkdir(parents=True)
    table_bytes = os.urandom(2000)
    (folder / "index" / "tensors" / "step0.parquet").write_bytes(table_bytes)
    (folder / "manifest.json").write_text('{"format": 1}')
    (folder / "old").mkdir()
    (folder / "old" / "stale.txt").write_text("stale")

    first = api.upload_folder(
        repo_id=repo, repo_type="dataset", folder_path=folder, commit_message="Add step 0"
    )
    weights = os.urandom(3000)
    second = api.create_commit(
        repo,
        repo_type="dataset",
        operations=[
            CommitOperationAdd("steps/step0/model.safetensors", weights),
            CommitOperationAdd("steps/step0/state.json", b'{"iteration": 0}'),
            CommitOperationDelete("manifest.json"),
            CommitOperationDelete("old/"),
        ],
        commit_message="Add weights",
        parent_commit=first.oid,
    )

    assert second.oid == hub_server.head(repo, repo_type="dataset")
    assert hub_server.commit_count(repo, repo_type="dataset") == 3  # initial commit + 2
    assert len(api.list_repo_commits(repo, repo_type="dataset")) == 3
    stored = hub_server.list_files(repo, repo_type="dataset")
    assert sorted(stored) == [
        ".gitattributes",
        "index/tensors/step0.parquet",
        "steps/step0/model.safetensors",
        "steps/step0/state.json",
    ]
    assert stored["steps/step0/model.safetensors"].lfs
    assert not stored["steps/step0/state.json"].lfs
    for path, content in [
        ("index/tensors/step0.parquet", table_bytes),
        ("steps/step0/model.safetensors", weights),
        ("steps/step0/state.json", b'{"iteration": 0}'),
    ]:
        local = hf_hub_download(repo, path, repo_type="dataset")
        assert Path(local).read_bytes() == content


def test_unchanged_upload_makes_no_commit(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("neox/same", repo_type="dataset")
    for _ in range(2):
        api.upload_file(
            path_or_fileobj=b"same bytes",
            path_in_repo="a.txt",
            repo_id="neox/same",
            repo_type="dataset",
        )

    assert hub_server.commit_count("neox/same", repo_type="dataset") == 2


def test_create_repo_conflicts_unless_exist_ok(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("neox/dup", repo_type="dataset")

    with pytest.raises(HfHubHTTPError) as raised:
        api.create_repo("neox/dup", repo_type="dataset")
    url = api.create_repo("neox/dup", repo_type="dataset", exist_ok=True)

    assert raised.value.response.status_code == 409
    assert url.repo_id == "neox/dup" and url.repo_type == "dataset"


def test_commit_on_a_stale_parent_is_refused(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("neox/race", repo_type="dataset")
    stale = hub_server.head("neox/race", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"1", path_in_repo="a.txt", repo_id="neox/race", repo_type="dataset"
    )

    with pytest.raises(HfHubHTTPError) as raised:
        api.create_commit(
            "neox/race",
            repo_type="dataset",
            operations=[CommitOperationAdd("b.txt", b"2")],
            commit_message="late",
            parent_commit=stale,
        )

    assert raised.value.response.status_code == 412
    assert hub_server.commit_count("neox/race", repo_type="dataset") == 2


def test_writes_without_a_token_are_refused(hub_server: HubServer) -> None:
    with pytest.raises(HfHubHTTPError) as raised:
        HfApi(token=False).create_repo("neox/anonymous", repo_type="dataset")

    assert raised.value.response.status_code == 401
    assert not hub_server.repo_exists("neox/anonymous", repo_type="dataset")
    assert HfApi().whoami()["name"]


def test_large_lfs_files_go_through_multipart_upload(hub_server: HubServer) -> None:
    hub_server.create_repo("neox/parts")
    hub_server.options.multipart_chunk_size = 1000
    content = os.urandom(2500)

    HfApi().upload_file(path_or_fileobj=content, path_in_repo="big.pt", repo_id="neox/parts")

    assert hub_server.count_requests("PUT", r"/part/\d+$") == 3
    assert hub_server.read_file("neox/parts", "big.pt") == content


def test_injected_503_on_a_download_surfaces_as_hub_http_error(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    rule = hub_server.inject(method="GET", path_regex=r"/resolve/step0/", status=503, times=1)

    with pytest.raises(HfHubHTTPError) as raised:
        hf_hub_download(CKPT_REPO, LAYER_FILE, revision="step0")
    recovered = hf_hub_download(CKPT_REPO, LAYER_FILE, revision="step0")

    assert raised.value.response.status_code == 503
    assert rule.fired == 1
    assert Path(recovered).read_bytes() == (ckpt_repo["step0"] / LAYER_FILE).read_bytes()


def test_injected_429_is_retried_by_the_client(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    rule = hub_server.inject(method="GET", path_regex=r"/resolve/", status=429, times=1)

    local = hf_hub_download(CKPT_REPO, "tiny.yml", revision="step1")

    assert rule.fired == 1
    assert Path(local).read_text() == (ckpt_repo["step1"] / "tiny.yml").read_text()
    assert [r.status for r in hub_server.requests if r.method == "GET"] == [429, 200]


def test_closed_connection_mid_download_restarts_a_small_file(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    hub_server.inject_drop(r"/resolve/", method="GET", after_bytes=1000)

    local = hf_hub_download(CKPT_REPO, LAYER_FILE, revision="step2")

    assert Path(local).read_bytes() == (ckpt_repo["step2"] / LAYER_FILE).read_bytes()
    gets = [r for r in hub_server.requests if r.method == "GET"]
    assert [r.fault for r in gets] == ["drop_response", None]
    # The client keeps only whole 10 MiB chunks, so it starts again from byte 0.
    assert "range" not in gets[1].headers and gets[1].status == 200


def test_closed_connection_mid_download_resumes_a_large_file_with_a_range(
    hub_server: HubServer,
) -> None:
    chunk = 10 * 1024 * 1024  # huggingface_hub constants.DOWNLOAD_CHUNK_SIZE
    content = os.urandom(chunk + 4096)
    hub_server.seed_repo("neox/large", {"big.pt": content})
    hub_server.inject_drop(r"/resolve/", method="GET", after_bytes=chunk + 100)

    local = hf_hub_download("neox/large", "big.pt")

    assert Path(local).read_bytes() == content
    resumed = [r for r in hub_server.requests if r.method == "GET"][1]
    assert resumed.headers["range"] == f"bytes={chunk}-" and resumed.status == 206


def test_reset_connection_mid_download_fails_at_once(
    hub_server: HubServer, ckpt_repo: dict[str, Path]
) -> None:
    hub_server.inject_drop(r"/resolve/", method="GET", after_bytes=1000, reset=True)

    with pytest.raises(httpx2.ReadError):
        hf_hub_download(CKPT_REPO, LAYER_FILE, revision="step2")


def test_dropped_lfs_upload_is_retried_by_the_client(hub_server: HubServer) -> None:
    rule = hub_server.inject_drop(
        r"^/__hubserver__/lfs/[0-9a-f]+$", method="PUT", phase="request", after_bytes=100
    )
    hub_server.create_repo("neox/flaky")
    content = os.urandom(5000)

    HfApi().upload_file(path_or_fileobj=content, path_in_repo="w.pt", repo_id="neox/flaky")

    assert rule.fired == 1
    assert hub_server.read_file("neox/flaky", "w.pt") == content


def test_commit_whose_response_is_lost_lands_but_raises(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("neox/lost", repo_type="dataset")
    hub_server.inject_lost_response()

    with pytest.raises(httpx2.RemoteProtocolError):
        api.upload_file(
            path_or_fileobj=b"landed",
            path_in_repo="a.txt",
            repo_id="neox/lost",
            repo_type="dataset",
        )

    assert hub_server.commit_count("neox/lost", repo_type="dataset") == 2
    assert hub_server.read_file("neox/lost", "a.txt", repo_type="dataset") == b"landed"


def test_load_dataset_reads_each_config_of_a_pushed_archive(
    hub_server: HubServer, tmp_path: Path
) -> None:
    import datasets

    folder = tmp_path / "archive"
    for kind in ("tensors", "checkpoints"):
        (folder / "index" / kind).mkdir(parents=True)
    for step in (0, 1):
        table = pa.table({"step": [step, step], "name": [f"a.{step}", f"b.{step}"]})
        pq.write_table(table, folder / "index" / "tensors" / f"step{step}.parquet")
        pq.write_table(
            pa.table({"step": [step]}), folder / "index" / "checkpoints" / f"step{step}.parquet"
        )
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: tensors\n  data_files:\n  - split: train\n    path: index/tensors/*.parquet\n"
        "- config_name: checkpoints\n  data_files:\n  - split: train\n    path: index/checkpoints/*.parquet\n"
        "---\n# Archive\n"
    )
    api = HfApi()
    api.create_repo("neox/pythia-tiny-archive", repo_type="dataset")
    api.upload_folder(
        repo_id="neox/pythia-tiny-archive",
        repo_type="dataset",
        folder_path=folder,
        commit_message="Push",
    )

    tensors = datasets.load_dataset("neox/pythia-tiny-archive", "tensors", split="train")
    checkpoints = datasets.load_dataset("neox/pythia-tiny-archive", "checkpoints", split="train")

    assert sorted(tensors["name"]) == ["a.0", "a.1", "b.0", "b.1"]
    assert sorted(checkpoints["step"]) == [0, 1]
    assert hub_server.internal_errors == []
