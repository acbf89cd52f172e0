"""Hostile checkpoints: nothing a pickle names ever runs, nothing a file holds escapes limits.

Every case of the generated corpus (tests/security/make_corpus.py) creates a marker file when
unpickled by ``torch.load(weights_only=False)`` or ``pickle.loads``. Read by the exporter,
through ``inspect``, ``convert`` and ``build``, each must give correct tensors with the
payload kept as an inert, flagged record, or one clear :class:`ExporterError`; never another
exception, never a traceback, never a marker. Resource bombs (tests/security/bombs.py) must
fail the same way within bounded time and an address-space cap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from security.bombs import BOMBS
from security.make_corpus import (
    HOST_TENSOR,
    INERT,
    PAYLOAD_KEY,
    REFUSED,
    Asm,
    Case,
    G,
    case_names,
    marker_dir,
    payloads,
    splice_payload,
    write_corpus,
)

from exporter.errors import ExporterError, UnsafePickleError
from exporter.pipeline.export import export_checkpoint
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, write_checkpoint
from exporter.sources.local import LocalSource
from exporter.torchfile import PickledObject, load_torch_file, to_json
from exporter.torchfile.unpickler import SAFE_FUNCTIONS, safe_unpickle

TESTS = Path(__file__).parent
CASES = case_names()
PAYLOADS = {p.name: p for p in payloads()}
# One hostile file per checkpoint folder, in each kind of file the exporter reads.
HOSTS = {
    "layer": "layer_02-model_00-model_states.pt",
    "mp_rank": "mp_rank_00_model_states.pt",
    "optim": "zero_pp_rank_1_mp_rank_00_optim_states.pt",
}


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", "-q", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _no_markers(folder: Path) -> None:
    markers = marker_dir(folder)
    assert not markers.exists() or not any(markers.iterdir()), list(markers.iterdir())


def _assert_one_clear_line(message: str, *mentions: str) -> None:
    assert message and "\n" not in message and len(message) < 600, message
    assert "Traceback" not in message
    for text in mentions:
        assert text in message, (text, message)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("corpus")
    return {case.name: case for case in write_corpus(folder)}


def test_the_corpus_covers_every_payload_family() -> None:
    families = ["os_system", "posix_system", "subprocess_popen", "subprocess_call",
                "subprocess_check_output", "builtins_eval", "builtins_exec",
                "import_getattr_chain", "operator_attrgetter", "operator_methodcaller",
                "functools_partial", "functools_reduce", "importlib_import_module",
                "pkgutil_resolve_name", "nested_torch_load", "in_dict_value", "in_list_item",
                "in_ordered_dict", "rebuild_storage_is_payload", "rebuild_size_is_payload",
                "rebuild_hooks_is_payload", "rebuild_metadata_is_payload",
                "build_state_is_payload", "protocol0_inst", "protocol1_obj", "newobj_partial",
                "newobj_ex_partial", "ext1_copyreg", "ext2_copyreg", "ext4_copyreg",
                "stack_global_names_from_memo", "stack_global_computed_name",
                "memo_get_callable", "persistent_id_is_payload", "legacy_torch_format"]
    stems = {name.rsplit(".", 1)[0] for name in CASES}
    assert not set(families) - stems
    assert len(CASES) == len(set(CASES)) >= 100


def test_every_payload_runs_under_an_unsafe_loader(tmp_path: Path) -> None:
    """The corpus is real: torch.load(weights_only=False) / pickle.loads creates each marker."""
    script = textwrap.dedent(f"""
        import json, pickle, sys, time
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        from security.make_corpus import write_corpus
        dead = []
        for case in write_corpus({str(tmp_path)!r}):
            try:
                if case.loader == "torch":
                    torch.load(case.path, weights_only=False)
                else:
                    pickle.loads(case.path.read_bytes())
            except Exception:
                pass
            deadline = time.monotonic() + 5
            while not case.marker.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not case.marker.exists():
                dead.append(case.name)
        print(json.dumps(dead))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert len(list(marker_dir(tmp_path).iterdir())) == len(CASES)


@pytest.mark.parametrize("name", CASES)
def test_reader_keeps_payload_inert_or_refuses_it(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    try:
        if case.loader == "torch":
            tf = load_torch_file(case.path)
            obj, unknown = tf.obj, set(tf.unknown_globals)
            tensors = {key: ref.read() for key, ref in tf.tensors()}
        else:
            result = safe_unpickle(case.path.read_bytes())
            obj, tensors = result.obj, {}
            unknown = {g for g, known in result.globals.items() if not known}
        rendered = json.dumps(to_json(obj), allow_nan=False)
    except ExporterError as exc:
        assert not case.marker.exists()
        assert case.expect == REFUSED, f"refused an inert payload: {exc}"
        _assert_one_clear_line(str(exc), *([str(case.path)] if case.loader == "torch" else []))
        return
    assert not case.marker.exists()
    assert case.expect == INERT, "a payload that must be refused was read"
    assert set(case.flags) <= unknown, "the payload's globals must be flagged unknown"
    if case.host_tensor:
        assert torch.equal(tensors["weight"], HOST_TENSOR)
    if not name.startswith(("rebuild_hooks", "rebuild_metadata", "build_sets_setstate",
                            "persistent_id_location", "rebuild_requires_grad")):
        # The payload is in the tree as a record, not dropped (hooks, metadata and instance
        # attributes are not part of the value torch would return either).
        assert '"__class__"' in rendered or "<pickled " in rendered


def test_payload_results_are_records_not_values(corpus: dict[str, Case]) -> None:
    tf = load_torch_file(corpus["os_system.pt"].path)
    record = tf.obj[PAYLOAD_KEY]
    assert isinstance(record, PickledObject)
    assert record.qualname == "os.system"
    assert record.args == (f"touch {corpus['os_system.pt'].marker}",)


@pytest.mark.parametrize("target", ["_codecs encode", "torch._utils _rebuild_tensor_v2",
                                    "collections OrderedDict", "torch FloatStorage"])
def test_a_pickle_cannot_modify_the_reader(target: str) -> None:
    module, name = target.split()
    before = {k: (getattr(v.func, "__defaults__", None), dict(getattr(v.func, "__dict__", {})))
              for k, v in SAFE_FUNCTIONS.items()}
    state = (None, {"__defaults__": ("latin1",), "dtype": G("torch", "float64")})
    tamper = Asm().push(G(module, name)).push(state).op(b"b").finish()
    with pytest.raises(UnsafePickleError, match="modify"):
        safe_unpickle(tamper)
    after = {k: (getattr(v.func, "__defaults__", None), dict(getattr(v.func, "__dict__", {})))
             for k, v in SAFE_FUNCTIONS.items()}
    assert after == before


def test_newobj_cannot_skip_a_known_class_constructor() -> None:
    pickle_bytes = Asm().push(G("numpy", "dtype")).push(("f8",)).op(b"\x81").finish()
    with pytest.raises(ExporterError):
        safe_unpickle(pickle_bytes)


def test_cli_inspect_reports_hostile_files_without_traceback(corpus: dict[str, Case]) -> None:
    folder = next(iter(corpus.values())).path.parent
    result = _cli("inspect", folder)
    assert result.returncode == 1
    _assert_one_clear_line(result.stderr.strip(), "neox-export: error:", "could not be read")
    torch_cases = [c for c in corpus.values() if c.loader == "torch"]
    for case in torch_cases:
        if case.expect == REFUSED:
            assert f"{case.path}: ERROR" in result.stdout, case.name
    flagged = {line.strip()[2:] for line in result.stdout.splitlines()
               if line.startswith("  ! ")}
    for case in torch_cases:
        if case.expect == INERT:
            assert set(case.flags) <= flagged, case.name
    _no_markers(folder)


def test_cli_inspect_one_hostile_file_at_a_time(corpus: dict[str, Case]) -> None:
    expected = {"posix_system.pt": 0, "protocol0_inst.pt": 0, "ext2_copyreg.pt": 1,
                "legacy_torch_format.pt": 1, "rebuild_size_is_payload.pt": 1}
    running = {name: subprocess.Popen([sys.executable, "-m", "exporter", "-q", "inspect",
                                       str(corpus[name].path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name in expected}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        case = corpus[name]
        assert process.returncode == expected[name], (name, stderr)
        assert "Traceback" not in stderr
        if expected[name] == 0:
            assert f"! {case.flags[0]}" in stdout
            assert "unknown global(s), kept as inert records" in stdout
        else:
            _assert_one_clear_line(stderr.strip(), "neox-export: error:")
            assert f"{case.path}: ERROR" in stdout
        assert not case.marker.exists()


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clean")
    write_checkpoint(root / "ckpt", TINY, step=8, dp=2)
    export_checkpoint(root / "ckpt", root / "out")
    return root / "ckpt", root / "out"


@pytest.fixture(scope="module")
def payload_run(tmp_path_factory: pytest.TempPathFactory,
                clean_checkpoint: tuple[Path, Path]) -> tuple[Path, dict[str, int]]:
    """A run folder with one step per (payload, host file kind)."""
    clean, _ = clean_checkpoint
    run = tmp_path_factory.mktemp("payload-run")
    steps: dict[str, int] = {}
    for step, (payload, host) in enumerate((p, h) for p in PAYLOADS for h in HOSTS):
        folder = run / "run" / f"step{step}"
        folder.mkdir(parents=True)
        for f in clean.iterdir():
            if f.name != HOSTS[host]:
                os.link(f, folder / f.name)
        splice_payload(clean / HOSTS[host], folder / HOSTS[host], PAYLOADS[payload],
                       marker_dir(run) / f"{payload}-{host}")
        steps[f"{payload}-{host}"] = step
    return run, steps


def _expected_ok(payload: str, host: str) -> bool:
    # Layer files hold name -> tensor only (DeepSpeed PipelineModule.save_state_dict), so any
    # extra entry is a layout error; engine and optimizer state keep unknown values as records.
    return PAYLOADS[payload].expect == INERT and host != "layer"


@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_convert_checkpoint_with_a_payload(payload_run: tuple[Path, dict[str, int]],
                                           clean_checkpoint: tuple[Path, Path], payload: str,
                                           host: str) -> None:
    run, steps = payload_run
    folder = run / "run" / f"step{steps[f'{payload}-{host}']}"
    out = run / "converted" / folder.name
    try:
        export_checkpoint(folder, out)
    except ExporterError as exc:
        assert not _expected_ok(payload, host), f"refused: {exc}"
        _assert_one_clear_line(str(exc), HOSTS[host])
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    else:
        assert _expected_ok(payload, host), "a hostile file was converted"
        expected = load_file(clean_checkpoint[1] / "model.safetensors")
        got = load_file(out / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        state = (out / "state.json").read_text()
        assert PAYLOAD_KEY in state
        if payload != "build_sets_setstate_attribute":  # an attribute, not part of the value
            for flag in PAYLOADS[payload].flags:
                assert flag in state
    _no_markers(run)


def test_build_with_payload_checkpoints_keeps_going(payload_run: tuple[Path, dict[str, int]],
                                                    tmp_path: Path) -> None:
    run, steps = payload_run
    # One host file kind per payload, in turn: every payload, every kind, a third of the steps.
    chosen = {key: step for key, step in steps.items() if step % (len(HOSTS) + 1) == 0}
    selection = ",".join(str(step) for step in chosen.values())
    summary = build(LocalSource(run / "run"), tmp_path / "archive",
                    BuildOptions(steps=selection, keep_going=True, quiet=True))
    _no_markers(run)
    status = {o.step: o for o in summary.outcomes}
    assert set(status) == set(chosen.values())
    assert {key.rsplit("-", 1)[1] for key in chosen} == set(HOSTS)
    manifest = json.loads((tmp_path / "archive" / "manifest.json").read_text())
    for key, step in chosen.items():
        payload, host = key.rsplit("-", 1)
        if _expected_ok(payload, host):
            assert status[step].status == "done", (key, status[step].error)
            assert str(step) in manifest["steps"]
        else:
            assert status[step].status == "failed", key
            assert HOSTS[host] in manifest["failed"][str(step)]["error"]
    assert len(manifest["steps"]) + len(manifest["failed"]) == len(chosen)


def test_cli_convert_of_hostile_checkpoints(payload_run: tuple[Path, dict[str, int]]) -> None:
    run, steps = payload_run
    refused = run / "run" / f"step{steps['ext1_copyreg-optim']}"
    result = _cli("convert", refused, "--out", run / "cli-refused")
    assert result.returncode == 1
    _assert_one_clear_line(result.stderr.strip(), "neox-export: error:", HOSTS["optim"],
                           "unregistered extension code")
    assert not (run / "cli-refused").exists()
    inert = run / "run" / f"step{steps['subprocess_popen-mp_rank']}"
    result = _cli("convert", inert, "--out", run / "cli-inert")
    assert result.returncode == 0, result.stderr
    assert '"__class__": "subprocess.Popen"' in (run / "cli-inert" / "state.json").read_text()
    _no_markers(run)


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("bombs")
    script = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
              "from security.bombs import main; main()")
    result = subprocess.run([sys.executable, "-c", script, str(folder / "files")],
                            capture_output=True, text=True, timeout=600, cwd=folder)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    results = {r["name"]: r for r in lines if "name" in r}
    results["_process"] = {"returncode": result.returncode, "stderr": result.stderr[-3000:],
                           "cap": next((r["address_space_cap"] for r in lines
                                        if "address_space_cap" in r), None)}
    results["_folder"] = {"path": str(folder)}
    return results


@pytest.mark.parametrize("name", list(BOMBS))
def test_resource_bomb_fails_cleanly_within_limits(bomb_results: dict[str, dict],
                                                   name: str) -> None:
    process = bomb_results["_process"]
    assert process["cap"], "the bomb runner did not cap its address space"
    assert name in bomb_results, f"the bomb runner died at or before {name}: {process}"
    result = bomb_results[name]
    bomb = BOMBS[name]
    assert result["seconds"] < 10
    if bomb.error is None:
        assert result["outcome"] == "ok", result
    else:
        assert result["outcome"] in ("CheckpointFormatError", "UnsafePickleError"), result
        assert re.search(bomb.error, result["message"]), result["message"]
        _assert_one_clear_line(result["message"])
        if bomb.action == "convert":
            assert "mp_rank_00_model_states.pt" in result["message"]


def test_traversal_names_reach_nothing_outside(bomb_results: dict[str, dict]) -> None:
    root = Path(bomb_results["_folder"]["path"])
    assert bomb_results["member_names_climb_out"]["outcome"] == "CheckpointFormatError"
    assert not list(root.parent.rglob("evil")) and not Path("/tmp/evil").exists()


def test_opcode_limit_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.torchfile import prescan

    monkeypatch.setattr(prescan, "MAX_OPCODES", 1000)
    assert safe_unpickle(b"\x80\x02" + b"N0" * 400 + b"N.").obj is None  # 803 opcodes
    with pytest.raises(UnsafePickleError, match="more than 1000 opcodes"):
        safe_unpickle(b"\x80\x02" + b"N0" * 600 + b"N.")


def test_reading_a_hostile_file_leaves_it_and_its_folder_unchanged(
        corpus: dict[str, Case], tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(corpus["torch_save_reduce.pt"].path.parent, folder,
                    ignore=shutil.ignore_patterns("markers"))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for path in before:
        try:
            load_torch_file(path)
        except ExporterError:
            pass
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
