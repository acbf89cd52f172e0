"""Publishing archives as Hub datasets, specified against the local Hub server.

Every test drives the real huggingface_hub / datasets clients against ``hub_server``.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from hubserver import HubServer
from huggingface_hub import DatasetCard
from safetensors.torch import load_file

from exporter import open_archive
from exporter.archive.card import card_text, write_card
from exporter.archive.index import read_index
from exporter.archive.layout import CARD_PLOT
from exporter.archive.plot import plot_statistic, statistic_series
from exporter.archive.push_state import deleted_after_push
from exporter.cli.hub import plot, push
from exporter.errors import ArchiveError, PublishError
from exporter.hub import publish
from exporter.hub.calls import RetryPolicy
from exporter.hub.files import step_files
from exporter.hub.publish import PushEvent
from exporter.hub.push import make_push_hook, push_archive
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

STEPS = (0, 1, 2, 4, 8)
INCLUDE = ("model", "optimizer", "state")
NO_WAIT = RetryPolicy(attempts=4, base_delay=0)
COMMIT_PATH = r"^/api/datasets/.+/commit/"
DENSE = "gpt_neox.layers.0.attention.dense.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    write_run(folder, TINY, steps=STEPS, dp=2, config=tiny_run_config(STEPS[-1]))
    return folder


@pytest.fixture(scope="module")
def built(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "archive"
    build(LocalSource(run), out, BuildOptions(quiet=True, export=ExportOptions(include=INCLUDE)))
    return out


@pytest.fixture
def archive(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built archive (pushing writes the card into it)."""
    return Path(shutil.copytree(built, tmp_path / "archive"))


def remote_files(server: HubServer, repo_id: str, revision: str = "main") -> dict[str, str]:
    files = server.list_files(repo_id, repo_type="dataset", revision=revision)
    return {path: entry.sha256 for path, entry in files.items()}


def commit_titles(server: HubServer, repo_id: str, branch: str = "main") -> list[str]:
    return [c.title for c in reversed(server.commits(repo_id, repo_type="dataset", branch=branch))]


def expected_remote(root: Path) -> dict[str, str]:
    """What a complete push holds: every step file and shard, the card, plot and manifest."""
    files = {f.path: f.sha256 for step in STEPS for f in step_files(root, step)}
    for path in ("README.md", CARD_PLOT, "manifest.json"):
        files[path] = hashlib.sha256((root / path).read_bytes()).hexdigest()
    return files


# -- a push and what can be read back ------------------------------------------------------


def test_pushed_archive_reads_back_tensor_for_tensor(hub_server: HubServer, archive: Path) -> None:
    result = push_archive(archive, "neox/tiny", steps_per_commit=2, retry=NO_WAIT)

    local = open_archive(archive)
    remote = open_archive("hf://datasets/neox/tiny")
    assert result.pushed_steps == list(STEPS) and result.skipped_steps == []
    assert remote.steps == local.steps == list(STEPS)
    assert remote.index.to_table().equals(local.index.to_table()) and remote.checkpoints.equals(local.checkpoints)
    for row in local.index.to_table().to_pylist():
        mine = local.tensor(row["step"], row["name"], row["kind"])
        theirs = remote.tensor(row["step"], row["name"], row["kind"])
        assert theirs.dtype == mine.dtype and torch.equal(theirs, mine), row["name"]
    for step in STEPS:
        assert remote.state(step) == local.state(step)
        assert remote.state_dict(step).keys() == local.state_dict(step).keys()


def test_pushed_remote_holds_exactly_the_archive_card_and_manifest(
    hub_server: HubServer, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "PATHS_PER_REQUEST", 5)  # files are read back in chunks

    result = push_archive(archive, "neox/tiny", retry=NO_WAIT)

    files = remote_files(hub_server, "neox/tiny")
    assert files.pop(".gitattributes")
    assert files == expected_remote(archive)
    assert len(result.commits) == 2
    assert hub_server.read_file("neox/tiny", "manifest.json", repo_type="dataset") == (
        archive / "manifest.json"
    ).read_bytes()
    assert hub_server.internal_errors == []


def test_index_configs_load_with_datasets(hub_server: HubServer, archive: Path) -> None:
    import datasets

    push_archive(archive, "neox/tiny", retry=NO_WAIT)

    tensors = datasets.load_dataset("neox/tiny", "tensors", split="train")
    checkpoints = datasets.load_dataset("neox/tiny", "checkpoints", split="train")
    index = read_index(archive / "index" / "tensors")
    assert sorted(zip(tensors["step"], tensors["kind"], tensors["name"], tensors["digest"],
                      strict=True)) == sorted(zip(*(index[c].to_pylist() for c in
                                                  ("step", "kind", "name", "digest")), strict=True))
    assert sorted(checkpoints["step"]) == list(STEPS)


def test_a_pushed_step_loads_as_a_transformers_model(hub_server: HubServer, archive: Path) -> None:
    from transformers import GPTNeoXForCausalLM

    push_archive(archive, "neox/tiny", retry=NO_WAIT)
    remote = open_archive("hf://datasets/neox/tiny")

    model, info = GPTNeoXForCausalLM.from_pretrained(remote.model_path(8),
                                                     output_loading_info=True)

    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = model.state_dict()
    for name, tensor in load_file(archive / "steps" / "step8" / "model.safetensors").items():
        target = name if name in loaded else "lm_head.weight"  # transformers 5 renames embed_out
        assert torch.equal(loaded[target].to(tensor.dtype), tensor), name


def test_reading_a_local_or_pushed_archive_never_unpickles(
    hub_server: HubServer, archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_archive(archive, "neox/tiny", retry=NO_WAIT)
    pickled = archive.parent / "plain.pt"
    torch.save({"w": torch.ones(2)}, pickled)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    class RefusingUnpickler:
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    with pytest.raises(AssertionError, match="pickle used"):  # the trap is armed
        torch.load(pickled, weights_only=False)

    for location in (archive, "hf://datasets/neox/tiny"):
        opened = open_archive(location)
        assert opened.tensor(8, DENSE).shape == (32, 32)
        assert DENSE in opened.state_dict(4)
        assert opened.state(2)


# -- commits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("per_commit", [2, 10])
def test_one_commit_per_k_steps_then_one_for_the_card(
    hub_server: HubServer, archive: Path, per_commit: int
) -> None:
    result = push_archive(archive, "neox/tiny", steps_per_commit=per_commit, retry=NO_WAIT)

    batches = math.ceil(len(STEPS) / per_commit)
    assert len(result.commits) == batches + 1
    # The server counts the repository's initial `.gitattributes` commit too.
    assert hub_server.commit_count("neox/tiny", repo_type="dataset") == 1 + batches + 1
    expected = {2: ["Add steps 0-1 (2 steps)", "Add steps 2-4 (2 steps)", "Add step 8"],
                10: ["Add steps 0-8 (5 steps)"]}[per_commit]
    assert commit_titles(hub_server, "neox/tiny") == [
        "initial commit", *expected, "Update dataset card and manifest"]


def test_every_commit_leaves_a_consistent_archive(hub_server: HubServer, archive: Path) -> None:
    push_archive(archive, "neox/tiny", steps_per_commit=2, retry=NO_WAIT)

    wanted = {step: {f.path: f.sha256 for f in step_files(archive, step)} for step in STEPS}
    for commit in hub_server.commits("neox/tiny", repo_type="dataset")[:-1]:
        files = remote_files(hub_server, "neox/tiny", commit.oid)
        listed = {int(s) for s in json.loads(hub_server.read_file(
            "neox/tiny", "manifest.json", repo_type="dataset", revision=commit.oid))["steps"]}
        present = {step for step in STEPS if any(p in files for p in wanted[step])}
        assert present == listed, commit.title
        for step in listed:
            assert {p: files.get(p) for p in wanted[step]} == wanted[step], (commit.title, step)
        assert open_archive("hf://datasets/neox/tiny", revision=commit.oid).steps == sorted(listed)


def test_pushing_an_unchanged_archive_again_makes_no_commit(
    hub_server: HubServer, archive: Path
) -> None:
    push_archive(archive, "neox/tiny", steps_per_commit=2, retry=NO_WAIT)
    before = hub_server.commit_count("neox/tiny", repo_type="dataset")

    again = push_archive(archive, "neox/tiny", steps_per_commit=2, retry=NO_WAIT)

    assert again.commits == [] and again.pushed_steps == []
    assert again.skipped_steps == list(STEPS)
    assert hub_server.commit_count("neox/tiny", repo_type="dataset") == before


def test_push_to_a_branch_leaves_main_alone(hub_server: HubServer, archive: Path) -> None:
    push_archive(archive, "neox/tiny", revision="export-v1", retry=NO_WAIT)

    assert set(remote_files(hub_server, "neox/tiny")) == {".gitattributes"}
    assert remote_files(hub_server, "neox/tiny", "export-v1").keys() - {".gitattributes"} == (
        expected_remote(archive).keys())
    assert open_archive("hf://datasets/neox/tiny", revision="export-v1").steps == list(STEPS)


# -- interruptions and errors ----------------------------------------------------------------


def test_interrupted_push_resumes_to_the_same_remote_as_an_uninterrupted_one(
    hub_server: HubServer, archive: Path
) -> None:
    push_archive(archive, "clean/tiny", steps_per_commit=2, retry=NO_WAIT)

    def crash_after_first_commit(event: PushEvent) -> None:
        if event.action == "commit":
            hub_server.inject(path_regex=COMMIT_PATH, method="POST", status=403, times=None)

    with pytest.raises(PublishError, match="403"):
        push_archive(archive, "flaky/tiny", steps_per_commit=2, retry=NO_WAIT,
                     progress=crash_after_first_commit)
    assert commit_titles(hub_server, "flaky/tiny") == ["initial commit", "Add steps 0-1 (2 steps)"]
    hub_server.clear_faults()
    resumed = push_archive(archive, "flaky/tiny", steps_per_commit=2, retry=NO_WAIT)

    assert resumed.skipped_steps == [0, 1] and resumed.pushed_steps == [2, 4, 8]
    clean, flaky = remote_files(hub_server, "clean/tiny"), remote_files(hub_server, "flaky/tiny")
    readme = {name: hub_server.read_file(name, "README.md", repo_type="dataset").decode()
              for name in ("clean/tiny", "flaky/tiny")}
    # The card names its repository; everything else is byte for byte the same.
    assert readme["flaky/tiny"] == readme["clean/tiny"].replace("clean/tiny", "flaky/tiny")
    del clean["README.md"], flaky["README.md"]
    assert flaky == clean
    assert commit_titles(hub_server, "flaky/tiny") == commit_titles(hub_server, "clean/tiny")


def test_a_commit_whose_response_is_lost_is_checked_not_repeated(
    hub_server: HubServer, archive: Path
) -> None:
    lost = hub_server.inject_lost_response(COMMIT_PATH)

    result = push_archive(archive, "neox/tiny", steps_per_commit=2, retry=NO_WAIT)

    assert lost.fired == 1
    assert hub_server.count_requests("POST", COMMIT_PATH) == 4  # 3 step commits + card
    assert hub_server.commit_count("neox/tiny", repo_type="dataset") == 5
    assert result.commits[0] == hub_server.commits("neox/tiny", repo_type="dataset")[-2].oid
    assert remote_files(hub_server, "neox/tiny").keys() - {".gitattributes"} == (
        expected_remote(archive).keys())


def test_rate_limits_server_errors_and_dropped_connections_are_retried(
    hub_server: HubServer, archive: Path
) -> None:
    rules = [
        hub_server.inject(path_regex=COMMIT_PATH, method="POST", status=429, times=2),
        hub_server.inject(path_regex=COMMIT_PATH, method="POST", status=503, times=1),
        hub_server.inject(path_regex=r"/revision/", method="GET", status=500, times=1),
        hub_server.inject_drop(r"/paths-info/", method="POST", times=1),
    ]
    events: list[PushEvent] = []

    # One commit meets all five failures; each costs one attempt of its budget.
    push_archive(archive, "neox/tiny", steps_per_commit=2, progress=events.append,
                 retry=RetryPolicy(attempts=6, base_delay=0))

    assert [rule.fired for rule in rules] == [2, 1, 1, 1]
    assert sum(e.action == "retry" for e in events) == 5
    assert hub_server.commit_count("neox/tiny", repo_type="dataset") == 5
    assert remote_files(hub_server, "neox/tiny").keys() - {".gitattributes"} == (
        expected_remote(archive).keys())


def test_a_refused_commit_stops_the_push_without_retrying(
    hub_server: HubServer, archive: Path
) -> None:
    hub_server.inject(path_regex=COMMIT_PATH, method="POST", status=403, times=None)

    with pytest.raises(PublishError, match="403"):
        push_archive(archive, "neox/tiny", retry=NO_WAIT)

    assert hub_server.count_requests("POST", COMMIT_PATH) == 1


def test_transient_errors_past_the_retry_budget_stop_the_push(
    hub_server: HubServer, archive: Path
) -> None:
    hub_server.inject(path_regex=COMMIT_PATH, method="POST", status=503, times=None)

    with pytest.raises(PublishError, match="503"):
        push_archive(archive, "neox/tiny", retry=RetryPolicy(attempts=3, base_delay=0))

    assert hub_server.count_requests("POST", COMMIT_PATH) == 3


def test_a_file_changed_since_the_build_is_not_published(
    hub_server: HubServer, archive: Path
) -> None:
    model = archive / "steps" / "step2" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))

    with pytest.raises(PublishError, match="step2/model.safetensors"):
        push_archive(archive, "neox/tiny", steps_per_commit=2, retry=NO_WAIT)

    assert not any("step2" in path for path in remote_files(hub_server, "neox/tiny"))


def test_an_archive_without_steps_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"steps": {}}))

    with pytest.raises(PublishError, match="no completed steps"):
        push_archive(tmp_path, "neox/empty", retry=NO_WAIT)
    with pytest.raises(PublishError, match="not an archive"):
        push_archive(tmp_path / "missing", "neox/empty", retry=NO_WAIT)


# -- the build hook --------------------------------------------------------------------------


def test_build_hook_pushes_steps_as_they_finish_and_deletes_them_after_verification(
    hub_server: HubServer, run: Path, tmp_path: Path
) -> None:
    root = tmp_path / "archive"
    events: list[PushEvent] = []
    hook = make_push_hook(root, "neox/live", steps_per_commit=2, delete_after_push=True,
                          retry=NO_WAIT, progress=events.append)
    commits_seen: list[int] = []

    def on_step_done(step: int) -> None:
        hook(step)
        exists = hub_server.repo_exists("neox/live", repo_type="dataset")
        commits_seen.append(hub_server.commit_count("neox/live", repo_type="dataset")
                            if exists else 0)

    build(LocalSource(run), root, BuildOptions(quiet=True, export=ExportOptions(include=INCLUDE),
                                               on_step_done=on_step_done))
    result = hook.flush()

    # The repository appears with the first pair of steps, then one commit per pair.
    assert commits_seen == [0, 2, 2, 3, 3]
    assert result.pushed_steps == list(STEPS)
    assert hub_server.commit_count("neox/live", repo_type="dataset") == 1 + 3 + 1
    assert not list((root / "steps").rglob("*.safetensors"))
    for step in STEPS:
        row = pq.read_table(root / "index" / "checkpoints" / f"step{step}.parquet").to_pylist()[0]
        removed = {e["path"]: e["sha256"] for e in row["output_files"]
                   if e["path"].endswith(".safetensors")}
        assert deleted_after_push(root, step) == removed
        assert (root / "steps" / f"step{step}" / "state.json").is_file()
        kinds = [e.action for e in events if step in e.steps]
        assert kinds.index("commit") < kinds.index("delete")
    files = remote_files(hub_server, "neox/live")
    for step in STEPS:
        for f in step_files(root, step):
            assert files[f.path] == f.sha256
    remote = open_archive("hf://datasets/neox/live")
    assert remote.steps == list(STEPS) and remote.tensor(8, DENSE).shape == (32, 32)
    assert push_archive(root, "neox/live", retry=NO_WAIT).commits == []
    with pytest.raises(PublishError, match="missing here, and not on the remote"):
        push_archive(root, "neox/elsewhere", retry=NO_WAIT)


def test_hook_flush_pushes_steps_a_resumed_build_skipped(
    hub_server: HubServer, run: Path, built: Path, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(built, tmp_path / "archive"))
    hook = make_push_hook(root, "neox/resumed", retry=NO_WAIT)

    summary = build(LocalSource(run), root, BuildOptions(
        quiet=True, export=ExportOptions(include=INCLUDE), on_step_done=hook))
    result = hook.flush()

    assert summary.count("skipped") == len(STEPS)
    assert result.pushed_steps == list(STEPS)
    assert remote_files(hub_server, "neox/resumed").keys() - {".gitattributes"} == (
        expected_remote(root).keys())


# -- card, plot and commands -----------------------------------------------------------------


def test_card_declares_license_tags_and_one_config_per_index_table(archive: Path) -> None:
    text = card_text(archive, "neox/tiny", license="mit")

    front, body = text.removeprefix("---\n").split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert DatasetCard(text).data.to_dict() == meta  # what the Hub and datasets parse
    assert meta["license"] == "mit"
    assert {"gpt-neox", "pythia", "checkpoints", "safetensors", "training-dynamics"} <= set(
        meta["tags"])
    configs = {c["config_name"]: c["data_files"] for c in meta["configs"]}
    assert configs == {
        "tensors": [{"split": "train", "path": "index/tensors/*.parquet"}],
        "checkpoints": [{"split": "train", "path": "index/checkpoints/*.parquet"}],
    }
    manifest = json.loads((archive / "manifest.json").read_text())
    assert manifest["source"] in body
    for step in STEPS:
        assert f"\n| {step} | " in body
    for snippet in ('open_archive("hf://datasets/neox/tiny")', "load_file(path)",
                    'load_dataset("neox/tiny", "tensors"', "GPTNeoXForCausalLM"):
        assert snippet in body


def test_card_is_regenerated_identically_and_embeds_its_plot(archive: Path) -> None:
    first = write_card(archive, "neox/tiny")
    readme, png = (archive / "README.md").read_bytes(), (archive / CARD_PLOT).read_bytes()

    assert write_card(archive, "neox/tiny") == first == ["README.md", CARD_PLOT]
    assert (archive / "README.md").read_bytes() == readme
    assert (archive / CARD_PLOT).read_bytes() == png and png.startswith(b"\x89PNG")
    assert f"]({CARD_PLOT})" in readme.decode()


def test_plot_series_are_the_index_statistic_of_each_matching_tensor(archive: Path) -> None:
    index = read_index(archive / "index" / "tensors")

    series = statistic_series(index, "l2", "layers.*.attention.dense.weight")

    assert [s.name for s in series] == [f"gpt_neox.layers.{i}.attention.dense.weight"
                                        for i in range(TINY.num_layers)]
    for s in series:
        rows = [r for r in index.to_pylist() if r["name"] == s.name and r["kind"] == "model"]
        assert s.steps == STEPS and list(s.values) == [r["l2"] for r in
                                                       sorted(rows, key=lambda r: r["step"])]
    with pytest.raises(ArchiveError, match="no model tensor matches"):
        statistic_series(index, "l2", "layers.*.nothing")
    with pytest.raises(ArchiveError, match="unknown statistic"):
        statistic_series(index, "median", "*")


def test_plot_docstring_example_runs(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import doctest

    import exporter.archive.plot as module

    monkeypatch.chdir(archive.parent)
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(module):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0
    assert (archive.parent / "dense_l2.png").read_bytes().startswith(b"\x89PNG")


def test_plot_command_draws_a_png(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots" / "mlp.png"

    result = CliRunner().invoke(plot, [str(archive), "--stat", "absmax", "--match",
                                       "layers.*.mlp.dense_4h_to_h.weight", "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG")
    refused = CliRunner().invoke(plot, [str(archive), "--match", "nothing", "--out", str(out)])
    assert isinstance(refused.exception, ArchiveError)


def test_push_command_publishes_and_reports(hub_server: HubServer, archive: Path) -> None:
    result = CliRunner().invoke(push, [str(archive), "neox/cli", "--steps-per-commit", "5"])

    assert result.exit_code == 0, result.output
    assert "2 commit(s), 5 step(s) pushed, 0 already there" in result.output
    assert hub_server.commit_count("neox/cli", repo_type="dataset") == 3


def test_plot_function_writes_where_it_is_told(archive: Path, tmp_path: Path) -> None:
    index = read_index(archive / "index" / "tensors")

    path = plot_statistic(index, stat="zero_count", match="*", kind="buffer",
                          out=tmp_path / "buffers.png")

    assert path == tmp_path / "buffers.png" and path.read_bytes().startswith(b"\x89PNG")
