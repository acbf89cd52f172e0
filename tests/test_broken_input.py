"""Broken input: truncated, corrupted, missing or mismatched files give one clear line.

Whatever is wrong with a checkpoint, the reader raises an ExporterError naming the file and
the problem, ``neox-export`` prints it as one line on stderr with a non-zero exit code and no
traceback, and nothing partial is left where the output would have gone. A ``build`` with
``--keep-going`` records the broken step in ``manifest.json`` and completes the others.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exporter.errors import ExporterError
from exporter.samples import TINY, tiny_run_config, write_run
from exporter.torchfile import load_torch_file, to_json

FILES = {
    "layer": "layer_02-model_00-model_states.pt",
    "mp_rank": "mp_rank_00_model_states.pt",
    "optim": "zero_pp_rank_1_mp_rank_00_optim_states.pt",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five trained steps of TINY; the small initial loss scale makes every step update."""
    root = tmp_path_factory.mktemp("broken") / "run"
    write_run(root, TINY, steps=[0, 1, 2, 3, 4], dp=2,
              config=tiny_run_config(4, initial_scale_power=4))
    return root


def _read_everything(path: Path) -> None:
    tf = load_torch_file(path)
    for _, ref in tf.tensors():
        ref.read()
    json.dumps(to_json(tf.obj), allow_nan=False)


def _clear(message: str, *mentions: str) -> None:
    assert message and "\n" not in message.strip() and "Traceback" not in message, message
    for text in mentions:
        assert text in message, (text, message)


def _cli(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "exporter", "-q", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _no_leftovers(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if ".tmp" in p.name or ".partial-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("keep", [0, 1, 22, 0.1, 0.5, 0.9, -22, -1])
def test_truncated_file_is_refused_naming_it(run: Path, tmp_path: Path, kind: str,
                                             keep: float) -> None:
    data = (run / "step2" / FILES[kind]).read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / FILES[kind]
    path.write_bytes(data[:cut])
    with pytest.raises(ExporterError) as info:
        _read_everything(path)
    _clear(str(info.value), str(path))


@pytest.mark.parametrize("kind", list(FILES))
def test_flipped_bytes_give_data_or_a_clear_error(run: Path, tmp_path: Path, kind: str) -> None:
    data = (run / "step2" / FILES[kind]).read_bytes()
    rng = random.Random(f"flips-{kind}")
    outcomes = {"read": 0, "refused": 0}
    for i in range(60):
        corrupted = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupted[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"{i}-{FILES[kind]}"
        path.write_bytes(corrupted)
        try:
            _read_everything(path)
            outcomes["read"] += 1
        except ExporterError as exc:
            _clear(str(exc), str(path))
            outcomes["refused"] += 1
    assert sum(outcomes.values()) == 60


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (random.Random(7).randbytes(4096), "not a torch zip"),
    (b"PK\x05\x06" + bytes(18), "expected one '<name>/data.pkl'"),
])
def test_non_checkpoints_are_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(ExporterError, match=problem) as info:
        _read_everything(path)
    _clear(str(info.value), str(path))


def test_cli_inspect_lists_every_broken_file_and_exits_1(run: Path, tmp_path: Path) -> None:
    for kind, name in FILES.items():
        data = (run / "step2" / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        (tmp_path / f"empty-{kind}.pt").write_bytes(b"")
    shutil.copy(run / "step2" / FILES["layer"], tmp_path / "fine.pt")
    process = _cli("inspect", tmp_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    _clear(stderr, "neox-export: error: 6 file(s) could not be read")
    assert stdout.count(": ERROR ") == 6
    assert "fine.pt" in stdout and "fine.pt: ERROR" not in stdout


def _broken_checkpoints(run: Path, root: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Copies of step 2, each broken one way -> (folder, what the error must mention)."""
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    def copy(name: str) -> Path:
        folder = root / name
        shutil.copytree(run / "step2", folder)
        return folder

    folder = copy("missing_mp_rank")
    (folder / FILES["mp_rank"]).unlink()
    cases["missing_mp_rank"] = (folder, ("mp_rank_00_model_states.pt",))
    folder = copy("empty_layer")
    (folder / FILES["layer"]).write_bytes(b"")
    cases["empty_layer"] = (folder, (FILES["layer"], "empty file"))
    folder = copy("truncated_optim")
    data = (folder / FILES["optim"]).read_bytes()
    (folder / FILES["optim"]).write_bytes(data[: len(data) // 3])
    cases["truncated_optim"] = (folder, (FILES["optim"],))
    folder = copy("garbage_mp_rank")
    (folder / FILES["mp_rank"]).write_bytes(random.Random(3).randbytes(5000))
    cases["garbage_mp_rank"] = (folder, (FILES["mp_rank"], "not a torch zip"))
    return cases


def test_cli_convert_of_broken_checkpoints(run: Path, tmp_path: Path) -> None:
    cases = _broken_checkpoints(run, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    running = {name: _cli("convert", folder, "--out", out / name)
               for name, (folder, _) in cases.items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, (name, stderr)
        _clear(stderr, "neox-export: error:", *cases[name][1])
        assert not (out / name).exists()
    _no_leftovers(out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("missing, mention", [
    ("layer_03-model_00-model_states.pt", "layer_03-model_00-model_states.pt"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
])
def test_cli_convert_names_the_missing_file(run: Path, tmp_path: Path, missing: str,
                                            mention: str) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(run / "step2", folder)
    (folder / missing).unlink()
    process = _cli("convert", folder, "--out", tmp_path / "out")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    _clear(stderr, "neox-export: error:", mention)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_cli_convert_refuses_partitions_from_different_steps(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(run / "step2", folder)
    shutil.copy(run / "step4" / FILES["optim"], folder / FILES["optim"])
    assert (folder / FILES["optim"]).read_bytes() != (run / "step2" / FILES["optim"]).read_bytes()
    process = _cli("convert", folder, "--out", tmp_path / "out")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0, "partitions of steps 2 and 4 were merged"
    _clear(stderr, "neox-export: error:", FILES["optim"])
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def _edit_engine_state(folder: Path, key: str, value: object) -> None:
    # Our own sample file: loading it with torch is safe, and the simplest way to edit it.
    path = folder / FILES["mp_rank"]
    state = torch.load(path, weights_only=False)
    state[key] = value
    torch.save(state, path)


def test_cli_convert_of_a_tensor_safetensors_cannot_hold(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "complex"
    shutil.copytree(run / "step2", folder)
    _edit_engine_state(folder, "extra", torch.zeros(3, dtype=torch.complex128))
    process = _cli("convert", folder, "--out", tmp_path / "out")
    _, stderr = process.communicate(timeout=300)
    if process.returncode == 0:  # kept somewhere, as long as it is not dropped
        assert "extra" in (tmp_path / "out" / "state.json").read_text()
    else:
        assert process.returncode == 1
        _clear(stderr, "neox-export: error:", "complex128")
        assert not (tmp_path / "out").exists()


def _build(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", "-q", "build", str(source),
                           "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture()
def run_with_broken_step(run: Path, tmp_path: Path) -> Path:
    source = tmp_path / "source"
    for step in (0, 2, 4):
        shutil.copytree(run / f"step{step}", source / f"step{step}")
    data = (source / "step2" / FILES["optim"]).read_bytes()
    (source / "step2" / FILES["optim"]).write_bytes(data[: len(data) // 2])
    return source


def test_build_keep_going_records_the_broken_step(run_with_broken_step: Path,
                                                  tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    result = _build(run_with_broken_step, archive, "--keep-going")
    assert "Traceback" not in result.stderr
    # -q hides the summary table; the failed step is still said, once, on stderr.
    failed = [line for line in result.stderr.splitlines() if "step 2:" in line]
    assert len(failed) == 1 and FILES["optim"] in failed[0], result.stderr
    manifest = json.loads((archive / "manifest.json").read_text())
    assert sorted(manifest["steps"]) == ["0", "4"]
    assert list(manifest["failed"]) == ["2"]
    _clear(manifest["failed"]["2"]["error"], FILES["optim"], "not a torch zip")
    assert not (archive / "steps" / "step2").exists()
    assert not (archive / "index" / "tensors" / "step2.parquet").exists()
    assert (archive / "steps" / "step4" / "model.safetensors").is_file()
    _no_leftovers(archive)
    assert result.returncode == 1, "a build with a failed step must exit non-zero"


def test_build_without_keep_going_stops_at_the_broken_step(run_with_broken_step: Path,
                                                           tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    result = _build(run_with_broken_step, archive)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    _clear(result.stderr.strip().splitlines()[-1], "neox-export: error: step 2:", FILES["optim"])
    manifest = json.loads((archive / "manifest.json").read_text())
    assert list(manifest["steps"]) == ["0"] and list(manifest["failed"]) == ["2"]
    assert not (archive / "steps" / "step4").exists()
    _no_leftovers(archive)


def test_build_keep_going_survives_out_of_range_engine_counters(run: Path,
                                                                tmp_path: Path) -> None:
    source = tmp_path / "source"
    for step in (0, 2):
        shutil.copytree(run / f"step{step}", source / f"step{step}")
    _edit_engine_state(source / "step2", "iteration", 2**70)
    archive = tmp_path / "archive"
    result = _build(source, archive, "--keep-going")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    manifest = json.loads((archive / "manifest.json").read_text())
    assert "0" in manifest["steps"]
    assert "2" in manifest["steps"] or "2" in manifest["failed"]
    _no_leftovers(archive)
