"""Hostile archives: the read path returns nothing from outside the archive root, raises only
the project's errors, and shows archive text as text.

Every case of the corpus (tests/security/archive_corpus.py) is a benign built archive with
one rule broken by hand, next to a folder of files that carry a marker. Read through
``open_archive`` (a folder, and the same files served by the Hub test server), ``verify``,
``push`` and ``plot``, each case must raise the :class:`ArchiveError` it names (or read
cleanly, for the text cases), and no byte of the marker may come back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hubserver import HubServer
from safetensors.torch import load_file
from security.archive_corpus import CASES
from security.archive_files import compress_model
from security.archive_reader import read_everything, verify_text
from security.hostile_archives import (
    DENSE,
    MARKER,
    MODEL,
    STEP,
    STEPS,
    ArchiveCase,
    plant_outside,
)

from exporter import open_archive
from exporter.archive.card import write_card
from exporter.archive.index import read_index
from exporter.archive.plot import plot_statistic
from exporter.cli import main
from exporter.errors import ExporterError
from exporter.hub.calls import RetryPolicy
from exporter.hub.publish import Publisher
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.sources import LocalSource

TESTS = Path(__file__).parent
#: cases whose hostile part ``verify`` never reads: it may pass them
VERIFY_IGNORES = {"weight_map_climbs_out", "weight_map_is_absolute", "push_record_climbs_out",
                  "state_json_links_out", "state_json_nested_too_deeply",
                  "index_holds_a_stray_table", "run_text_is_markup_and_escapes"}
#: folders whose files no Python-level ``open`` may reach while set (see ``_audit``)
WATCHED: list[tuple[str, list[str]]] = []


def _audit(event: str, args: tuple) -> None:
    """Record every file opened (``open`` audit event of ``io.open`` and ``os.open``) that
    resolves into a watched folder."""
    if event == "open" and WATCHED and isinstance(args[0], (str, bytes, os.PathLike)):
        real = os.path.realpath(os.fsdecode(args[0]))
        for folder, hits in WATCHED:
            if real.startswith(folder + os.sep):
                hits.append(real)


sys.addaudithook(_audit)
NO_WAIT = RetryPolicy(attempts=2, base_delay=0)
LOCAL = [c for c in CASES.values()]
ON_THE_HUB = [c for c in CASES.values() if not c.local_only]


@pytest.fixture(scope="module")
def benign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny sample run as an archive, and the same with a compressed model file."""
    run = tmp_path_factory.mktemp("run")
    write_run(run, TINY, steps=STEPS, dp=2, config=tiny_run_config(STEP))
    plain = tmp_path_factory.mktemp("benign") / "archive"
    build(LocalSource(run), plain, BuildOptions(quiet=True,
                                                export=ExportOptions(include=("model", "state"))))
    packed = Path(shutil.copytree(plain, tmp_path_factory.mktemp("packed") / "archive"))
    compress_model(packed, STEP)
    return {"plain": plain, "packed": packed}


def make(case: ArchiveCase, benign: dict[str, Path], folder: Path) -> tuple[Path, Path]:
    """The case's archive (``folder/archive``) and its outside files (``folder/outside``)."""
    root = Path(shutil.copytree(benign["packed" if case.compressed else "plain"],
                                folder / "archive", symlinks=True))
    outside = folder / "outside"
    plant_outside(root, outside)
    case.build(root, outside)
    return root, outside


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_outcome(case: ArchiveCase, out: list[bytes], errors: list[ExporterError]) -> None:
    """No marker came back; the errors are the project's, one line each, and as expected."""
    assert not [b for b in out if MARKER in b], f"{case.name}: bytes from outside came back"
    for error in errors:
        assert "\n" not in str(error), (case.name, str(error))
    messages = [str(e) for e in errors]
    if case.refused is None:
        assert not errors, (case.name, messages)
    else:
        assert any(re.search(case.refused, m) for m in messages), (case.name, messages)


def test_the_corpus_covers_every_family_of_rule() -> None:
    families = {c.family for c in CASES.values()}
    assert families == {"path", "header", "compressed", "schema", "text"}
    assert len(CASES) >= 60 and len(ON_THE_HUB) >= 45


def test_the_benign_archives_read_back_what_safetensors_reads(benign: dict[str, Path]) -> None:
    for which, root in benign.items():
        out, errors = read_everything(root, root)
        assert not errors, (which, errors)
        opened = open_archive(root)
        expected = load_file(root / "steps" / "step0" / "model.safetensors")
        assert all(torch.equal(opened.tensor(0, n), t) for n, t in expected.items())
    assert torch.equal(open_archive(benign["packed"]).tensor(STEP, DENSE),
                       open_archive(benign["plain"]).tensor(STEP, DENSE))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", LOCAL, ids=[c.name for c in LOCAL])
def test_open_archive_refuses_a_hostile_archive_and_reads_nothing_outside(
        case: ArchiveCase, benign: dict[str, Path], tmp_path: Path) -> None:
    root, outside = make(case, benign, tmp_path)
    before = digest(outside)

    out, errors = read_everything(root, root)

    check_outcome(case, out, errors)
    assert digest(outside) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", LOCAL, ids=[c.name for c in LOCAL])
def test_verify_and_plot_from_the_cli_print_no_outside_byte_and_fail_in_one_line(
        case: ArchiveCase, benign: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, outside = make(case, benign, tmp_path)
    for argv in (["verify", str(root)], ["plot", str(root), "--out", str(tmp_path / "p.png")]):
        opened: list[str] = []
        WATCHED.extend([(os.path.realpath(outside), opened),
                        (os.path.realpath(root / ".git"), opened)])
        try:
            main(["-q", *argv])
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            WATCHED.clear()
        printed = capsys.readouterr()
        assert not opened, (case.name, argv[0], opened)
        if argv[0] == "verify" and case.refused is not None and case.name not in VERIFY_IGNORES:
            assert code == 1, (case.name, printed.out)
        assert code in (0, 1), (case.name, argv[0], printed.err)
        assert MARKER.decode() not in printed.out + printed.err
        assert "\x1b" not in printed.out + printed.err and "Traceback" not in printed.err
        if code:
            assert printed.err.startswith("neox-export: error: ")
            assert printed.err.count("\n") == 1, printed.err


@pytest.mark.timeout(300)
def test_open_archive_through_the_hub_refuses_the_corpus(
        hub_server: HubServer, benign: dict[str, Path], tmp_path: Path) -> None:
    for case in ON_THE_HUB:
        root, outside = make(case, benign, tmp_path / case.name)
        files = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
                 if p.is_file() and ".git" not in p.relative_to(root).parts}
        hub_server.seed_repo(f"hostile/{case.name}", files, repo_type="dataset")

        out, errors = read_everything(f"hf://datasets/hostile/{case.name}")

        if case.name == "index_file_points_into_git":
            case = ArchiveCase(case.name, case.family, case.build, "points into .git")
        if case.family in ("header", "text"):
            # A Hub tensor is read by its byte range, at the offsets of the validated index
            # row, never through the file's header, and checked against the row's digest: a
            # hostile header changes nothing that is read, and bytes that differ from the
            # index (the text cases record a wrong digest on purpose) are refused. So either
            # the read is refused, or it returns the archive's own bytes (never a marker).
            assert not [b for b in out if MARKER in b], case.name
            assert all(re.search(r"(sha256|blake3) of the bytes|does not match|lie outside the file|" + (case.refused or "$^"), str(e))
                       for e in errors), (case.name, [str(e) for e in errors])
            continue
        check_outcome(case, out, errors)


def test_a_hub_archive_cannot_read_another_repository_in_the_cache(
        hub_server: HubServer, benign: dict[str, Path], tmp_path: Path) -> None:
    """The victim repository is in the local Hub cache; the hostile index names its file."""
    root, outside = make(next(iter(CASES.values())), benign, tmp_path)
    hub_server.seed_repo("victim/secret", {MODEL: outside / "secret.safetensors"},
                         repo_type="dataset")
    from huggingface_hub import hf_hub_download

    victim = Path(hf_hub_download("victim/secret", MODEL, repo_type="dataset"))
    snapshot = victim.parents[2]  # <cache>/datasets--victim--secret/snapshots/<commit>
    assert snapshot.parent.parent.name == "datasets--victim--secret"
    sneaky = f"../../../datasets--victim--secret/snapshots/{snapshot.name}/{MODEL}"
    shutil.rmtree(root)
    shutil.copytree(benign["plain"], root)
    from security.archive_files import edit_row

    edit_row(root, STEP, DENSE, file=sneaky)
    hub_server.seed_repo("hostile/cache", root, repo_type="dataset")

    out, errors = read_everything("hf://datasets/hostile/cache")

    check_outcome(ArchiveCase("cache", "path", lambda r, o: None, "leaves the archive"), out,
                  errors)


@pytest.mark.timeout(300)
def test_push_uploads_and_deletes_nothing_outside_the_archive(
        hub_server: HubServer, benign: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    outcomes = {}
    for case in LOCAL:
        root, outside = make(case, benign, tmp_path / case.name)
        before = digest(outside)
        repo = f"push/{case.name}"
        try:
            Publisher(root, repo, delete_after_push=True, retry=NO_WAIT).push_all()
            outcomes[case.name] = "pushed"
        except ExporterError as exc:
            outcomes[case.name] = str(exc)
            assert "\n" not in str(exc), (case.name, str(exc))
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_code:  # the same refusal from the CLI
                main(["-q", "push", str(root), f"{repo}-cli"])
            printed = capsys.readouterr().err
            assert exit_code.value.code == 1 and printed.count("\n") == 1, (case.name, printed)
            assert printed.startswith("neox-export: error: ") and MARKER.decode() not in printed
        assert digest(outside) == before, case.name
        if hub_server.repo_exists(repo, repo_type="dataset"):
            for path in hub_server.list_files(repo, repo_type="dataset"):
                assert MARKER not in hub_server.read_file(repo, path, repo_type="dataset"), (
                    case.name, path)
    refused = {n for n, o in outcomes.items() if o != "pushed"}
    assert {c.name for c in LOCAL if c.family == "path" and c.refused} - {
        "weight_map_climbs_out", "weight_map_is_absolute"} <= refused
    assert {c.name for c in LOCAL if c.family == "schema"} - {
        "index_holds_a_stray_table", "state_json_nested_too_deeply"} <= refused


def _rendered(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


@pytest.mark.parametrize("name", [c.name for c in CASES.values() if c.family == "text"])
def test_archive_text_shows_as_text_in_the_card(
        name: str, benign: dict[str, Path], tmp_path: Path) -> None:
    root, _ = make(CASES[name], benign, tmp_path)

    write_card(root, "neox/hostile")

    card = (root / "README.md").read_text()
    html = _rendered(card)
    for tag in ("<script", "<b>", 'href="javascript:'):
        assert tag not in html, tag
    assert re.findall(r"<img [^>]*>", html) == [
        '<img src="assets/attention_dense_l2.png" alt="l2 norm of each layer\'s '
        'attention.dense.weight per step" />']  # the card's own plot, nothing else
    assert "\x1b" not in card and "\u202e" not in card and "\x07" not in card
    assert html.count("<tr>") == 1 + len(STEPS) + 5 + 1  # steps table, converted table
    assert "&lt;script&gt;" in html


def test_a_tensor_name_with_mathtext_and_escapes_is_drawn_as_text(
        benign: dict[str, Path], tmp_path: Path) -> None:
    root, _ = make(CASES["tensor_name_is_markup_and_escapes"], benign, tmp_path)

    path = plot_statistic(read_index(root / "index" / "tensors"), match="layers.9.*",
                          out=tmp_path / "plot.png")

    assert path.read_bytes().startswith(b"\x89PNG")


def test_verify_names_a_hostile_tensor_without_its_escapes(
        benign: dict[str, Path], tmp_path: Path) -> None:
    root, _ = make(CASES["tensor_name_is_markup_and_escapes"], benign, tmp_path)

    text, errors = verify_text(root)

    assert not errors and "blake3 does not match the index" in text
    assert "\\x1b[2J" in text and "\x1b" not in text and "\u202e" not in text


@pytest.mark.timeout(300)
def test_the_corpus_reads_in_bounded_memory_and_time(
        benign: dict[str, Path], tmp_path: Path) -> None:
    for case in LOCAL:
        make(case, benign, tmp_path / "cases" / case.name)
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
              "from security.archive_reader import main; main()")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cases"),
                             MARKER.decode()], capture_output=True, text=True, timeout=280)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[0].get("address_space_cap"), result.stderr[-2000:]
    results = {r["name"]: r for r in lines[1:]}
    assert results.keys() == {c.name for c in LOCAL}, result.stderr[-2000:]
    for name, outcome in results.items():
        assert outcome["outcome"] == "ok", outcome
        assert not outcome["marker"], name
        assert outcome["seconds"] < 20, outcome
        refused = CASES[name].refused
        assert refused is None or any(re.search(refused, m) for m in outcome["errors"]), outcome
