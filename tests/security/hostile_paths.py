"""Hostile archives, ``path`` family: content paths that lead out of the archive root."""

from __future__ import annotations

import json
from pathlib import Path

from security.archive_files import edit_row, edit_rows, read_safetensors
from security.hostile_archives import DENSE, MODEL, STEP, case, git_secret, link

# -- paths from archive content --------------------------------------------------------------


@case("path", r"leaves the archive \('\.\.'\)")
def index_file_climbs_out(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file="../outside/secret.safetensors")


@case("path", "is absolute")
def index_file_is_absolute(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file=str(outside / "secret.safetensors"))


@case("path", "leaves the archive")
def index_file_climbs_out_through_its_step(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file=f"steps/step{STEP}/../../../outside/secret.safetensors")


@case("path", "holds a backslash")
def index_file_climbs_out_with_backslashes(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file="steps\\..\\..\\outside\\secret.safetensors")


@case("path", "control characters")
def index_file_holds_a_nul(root: Path, outside: Path) -> None:
    edit_row(root, STEP, DENSE, file=f"{MODEL}\x00/../../../outside/secret.safetensors")


@case("path", r"points into \.git")
def index_file_points_into_git(root: Path, outside: Path) -> None:
    git_secret(root, outside)
    edit_row(root, STEP, DENSE, file=".git/secret.safetensors")


@case("path", "leads outside the archive", local_only=True)
def model_file_links_out(root: Path, outside: Path) -> None:
    link(root / MODEL, outside / "secret.safetensors")


@case("path", "leads outside the archive", local_only=True)
def model_file_links_out_relatively(root: Path, outside: Path) -> None:
    link(root / MODEL, "../../../outside/secret.safetensors")


@case("path", r"leads into \.git", local_only=True)
def model_file_links_into_git(root: Path, outside: Path) -> None:
    git_secret(root, outside)
    link(root / MODEL, "../../.git/secret.safetensors")


@case("path", "leads outside the archive", local_only=True)
def step_folder_links_out(root: Path, outside: Path) -> None:
    link(root / "steps" / f"step{STEP}", outside / f"step{STEP}")


@case("path", "leads outside the archive", local_only=True)
def index_folder_links_out(root: Path, outside: Path) -> None:
    link(root / "index" / "tensors", outside / "tensors")


@case("path", "leads outside the archive", local_only=True)
def manifest_links_out(root: Path, outside: Path) -> None:
    link(root / "manifest.json", outside / "manifest.json")


@case("path", "leads outside the archive", local_only=True)
def state_json_links_out(root: Path, outside: Path) -> None:
    link(root / "steps" / f"step{STEP}" / "state.json", outside / "state.json")


def _weight_map(root: Path, file: str) -> None:
    names = list(read_safetensors(root / MODEL)[0].keys() - {"__metadata__"})
    (root / "steps" / f"step{STEP}" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(names, file)}))


@case("path", r"weight_map\[.*leaves the archive")
def weight_map_climbs_out(root: Path, outside: Path) -> None:
    _weight_map(root, "../../../outside/secret.safetensors")


@case("path", r"weight_map\[.*is absolute")
def weight_map_is_absolute(root: Path, outside: Path) -> None:
    _weight_map(root, str(outside / "secret.safetensors"))


@case("path", r"output_files\[\d+\].*leaves the archive")
def output_files_climb_out(root: Path, outside: Path) -> None:
    def edit(rows: list[dict]) -> None:
        secret = outside / "secret.safetensors"
        rows[0]["output_files"].append({"path": "../outside/secret.safetensors",
                                        "sha256": "0" * 64, "bytes": secret.stat().st_size})
    edit_rows(root, STEP, edit, table="checkpoints")


@case("path", r"\.push/step8\.json: deleted.*leaves the archive", local_only=True)
def push_record_climbs_out(root: Path, outside: Path) -> None:
    (root / ".push").mkdir()
    (root / ".push" / f"step{STEP}.json").write_text(json.dumps(
        {"deleted": {"../outside/secret.safetensors": "0" * 64}}))


@case("path", None, local_only=True)
def index_folder_holds_a_link_loop(root: Path, outside: Path) -> None:
    (root / "index" / "tensors" / "loop").symlink_to("..")


@case("path", "cannot be resolved: Too many levels of symbolic links", local_only=True)
def model_file_links_to_itself(root: Path, outside: Path) -> None:
    link(root / MODEL, "model.safetensors")
