"""What a new user hits with the Hub: tokens, licenses, revisions, offline mode, progress bars.

Every test drives the real huggingface_hub client against the local Hub server (``hub_server``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from cli_helpers import assert_one_error_line, run_cli, tiny_run
from hubserver import HubServer

from exporter import BuildOptions, build, open_archive, open_source
from exporter.archive.card import card_text
from exporter.errors import ArchiveError

DATASET = "me/tiny-checkpoints"
DENSE = "gpt_neox.layers.0.attention.dense.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory, (0, 8))


@pytest.fixture(scope="module")
def built(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "archive"
    build(open_source(str(run)), out, BuildOptions(quiet=True))
    return out


@pytest.fixture
def archive(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "archive"))


def _front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


# -- point 10: tokens ---------------------------------------------------------------------------

def test_push_without_a_token_says_how_to_get_one(
        hub_server: HubServer, archive: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    ran = run_cli(capsys, "push", archive, DATASET)
    line = assert_one_error_line(ran, 1, "no Hub token", "set HF_TOKEN", "`hf auth login`")
    assert "http" not in line  # no link to a web page, no HTTP library text
    assert hub_server.requests == []  # said before any request, not after a 401
    assert ran.out == ""


def test_the_clients_missing_token_error_becomes_one_line() -> None:
    from huggingface_hub.errors import LocalTokenNotFoundError

    from exporter.errors import PublishError
    from exporter.hub.calls import RetryPolicy, hub_call

    def create_repo() -> None:
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found. You "
                                      "need to provide a token or be logged in to Hugging Face "
                                      "with `hf auth login`. See https://huggingface.co/settings/tokens.")

    with pytest.raises(PublishError, match=r"set HF_TOKEN .* or run `hf auth login`$"):
        hub_call(create_repo, what="create the repository", repo_id=DATASET,
                 policy=RetryPolicy(attempts=1), error=PublishError)


@pytest.mark.parametrize("token", ["", "hf_abc def", "hf_abc\n"])
def test_a_malformed_token_is_a_usage_error(
        token: str, hub_server: HubServer, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_cli(capsys, "push", archive, DATASET, "--token", token)
    line = assert_one_error_line(ran, 2, "--token")
    assert "Illegal header" not in line
    assert not hub_server.repo_exists(DATASET, repo_type="dataset")


# -- point 13: license and card -----------------------------------------------------------------

def test_push_refuses_a_license_the_hub_does_not_know(
        hub_server: HubServer, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_cli(capsys, "push", archive, DATASET, "--license", "apache2")
    assert_one_error_line(ran, 2, "--license", "'apache2'", "apache-2.0")
    assert not hub_server.repo_exists(DATASET, repo_type="dataset")


def test_push_takes_the_license_of_the_source_model(
        hub_server: HubServer, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub_server.seed_repo("org/model", {"README.md": b"---\nlicense: mit\n---\n# model\n"})
    manifest = json.loads((archive / "manifest.json").read_text())
    manifest["source"] = "hf://org/model"
    (archive / "manifest.json").write_text(json.dumps(manifest))
    ran = run_cli(capsys, "-q", "push", archive, DATASET)
    assert ran.code == 0, ran.err
    card = hub_server.read_file(DATASET, "README.md", repo_type="dataset").decode()
    assert _front_matter(card)["license"] == "mit"
    assert f"]({hub_server.endpoint}/org/model)" in card  # the source link follows HF_ENDPOINT


def test_push_of_a_local_source_says_the_license_is_unknown(
        hub_server: HubServer, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_cli(capsys, "-q", "push", archive, DATASET)
    assert ran.code == 0, ran.err
    assert "license: unknown" in ran.err and "--license" in ran.err
    card = hub_server.read_file(DATASET, "README.md", repo_type="dataset").decode()
    assert _front_matter(card)["license"] == "unknown"


def test_card_has_size_category_citation_and_endpoint_links(
        built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://hub.internal:8080")
    manifest = json.loads((built / "manifest.json").read_text())
    text = card_text(built, DATASET, license="mit")
    metadata = _front_matter(text)
    assert metadata["size_categories"] == ["n<1K"]  # 2 steps x 117 tensors
    assert "## Citation" in text and "@misc{" in text
    assert "http://hub.internal:8080/datasets/me/tiny-checkpoints" in text
    assert "https://huggingface.co/" not in text.replace("https://huggingface.co/docs", "")
    assert manifest["source"] in text


def test_card_of_a_pythia_source_cites_pythia(built: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(built, tmp_path / "a"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["source"] = "hf://EleutherAI/neox-ckpt-pythia-410m-seed8"
    (root / "manifest.json").write_text(json.dumps(manifest))
    text = card_text(root, DATASET)
    assert "biderman2023pythia" in text
    assert "/EleutherAI/neox-ckpt-pythia-410m-seed8)" in text


# -- point 12: revisions and offline mode -------------------------------------------------------

def test_open_archive_pins_an_at_revision(hub_server: HubServer, built: Path) -> None:
    hub_server.seed_repo(DATASET, built, repo_type="dataset", branch="dev")
    archive = open_archive(f"hf://datasets/{DATASET}@dev")
    assert archive.steps == [0, 8]
    assert archive.tensor(8, DENSE).shape == (32, 32)
    with pytest.raises(ArchiveError):
        open_archive(f"hf://datasets/{DATASET}").steps  # noqa: B018 - main holds no archive
    with pytest.raises(ArchiveError, match="in the URI, .main. asked for"):
        open_archive(f"hf://datasets/{DATASET}@dev", revision="main")


def test_a_cached_archive_reads_offline(
        hub_server: HubServer, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    hub_server.seed_repo(DATASET, built, repo_type="dataset")
    online = open_archive(f"hf://datasets/{DATASET}")
    expected = online.tensor(8, DENSE).clone()
    rows = online.index.count_rows()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_server.clear_requests()
    offline = open_archive(f"hf://datasets/{DATASET}")
    assert offline.index.count_rows() == rows
    assert bool((offline.tensor(8, DENSE) == expected).all())
    ran = run_cli(capsys, "plot", f"hf://datasets/{DATASET}", "--out", tmp_path / "p.png")
    assert ran.code == 0, ran.err
    assert hub_server.requests == []
    with pytest.raises(ArchiveError, match="HF_HUB_OFFLINE"):  # never read online here
        open_archive(f"hf://datasets/{DATASET}@other").steps  # noqa: B018


def test_build_of_an_at_branch_source_builds_that_step(
        hub_server: HubServer, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for step in (0, 8):
        hub_server.seed_repo("org/run", run / f"step{step}", branch=f"step{step}")
    ran = run_cli(capsys, "-q", "build", "hf://org/run@step8", "--out", tmp_path / "a",
                  "--include", "model")
    assert ran.code == 0, ran.err
    assert open_archive(tmp_path / "a").steps == [8]
    ran = run_cli(capsys, "build", "hf://org/run@main", "--out", tmp_path / "b")
    assert_one_error_line(ran, 1, "'main' is not a step branch", "step0, step8")


# -- point 11: huggingface_hub's progress bars --------------------------------------------------

def test_no_hub_progress_bars_when_stderr_is_not_a_terminal(
        hub_server: HubServer, archive: Path) -> None:
    # huggingface_hub draws its upload bars unless told not to; the test environment tells it
    # (HF_HUB_DISABLE_PROGRESS_BARS=1), a user's does not.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-m", "exporter", "push", str(archive), DATASET],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr, done.stderr
    assert "Upload" not in done.stderr
    assert hub_server.list_files(DATASET, repo_type="dataset")


def test_push_archive_defaults_to_the_source_license_not_apache(
        hub_server: HubServer, archive: Path) -> None:
    from exporter.errors import OptionsError
    from exporter.hub.push import push_archive

    with pytest.raises(OptionsError, match="'Apache 2'"):
        push_archive(archive, DATASET, license="Apache 2")
    push_archive(archive, DATASET)
    card = hub_server.read_file(DATASET, "README.md", repo_type="dataset").decode()
    assert _front_matter(card)["license"] == "unknown"  # a local source says nothing
