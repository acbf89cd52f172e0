"""Which files make up one GPT-NeoX / DeepSpeed checkpoint folder.

File names follow DeepSpeed ``runtime/engine.py`` (``_get_ckpt_name``,
``_get_zero_ckpt_name``) and ``runtime/pipe/module.py`` (``ckpt_layer_path``):
``layer_{idx:02d}-model_{tp:02d}-model_states.pt``, ``mp_rank_{mp:02d}_model_states.pt``,
``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import LayoutError

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


@dataclass
class CheckpointFiles:
    """The recognised files of one checkpoint folder.

    Attributes:
        layer_files: (pipeline layer index, tensor-parallel rank) -> path.
        mp_files: model-parallel rank -> the engine-state file.
        optim_files: (data-parallel rank, model-parallel rank) -> ZeRO partition file.
        configs: the ``*.yml`` / ``*.yaml`` GPT-NeoX configs.
        other: files we do not interpret (reported, never silently dropped).
    """

    folder: Path
    layer_files: dict[tuple[int, int], Path] = field(default_factory=dict)
    mp_files: dict[int, Path] = field(default_factory=dict)
    optim_files: dict[tuple[int, int], Path] = field(default_factory=dict)
    configs: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)
    bf16_optim_prefix: bool = False

    @property
    def tp_ranks(self) -> list[int]:
        return sorted({tp for _, tp in self.layer_files})

    @property
    def layer_indices(self) -> list[int]:
        return sorted({layer for layer, _ in self.layer_files})

    @property
    def is_pipeline(self) -> bool:
        return bool(self.layer_files)

    def all_files(self) -> list[Path]:
        return sorted(
            [*self.layer_files.values(), *self.mp_files.values(), *self.optim_files.values(),
             *self.configs]
        )


def optim_file_name(dp: int, mp: int, bf16: bool = False) -> str:
    """DeepSpeed's ZeRO partition file name (``engine._get_zero_ckpt_name``)."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


def scan_checkpoint(folder: str | Path) -> CheckpointFiles:
    """Classify the files of checkpoint folder ``folder``.

    Raises:
        LayoutError: not a folder, or it holds neither layer files nor engine-state files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LayoutError(f"{folder}: not a checkpoint folder")
    outer, folder = folder, checkpoint_root(folder)
    files = CheckpointFiles(folder)
    if outer != folder:
        files.configs += sorted(p for p in outer.glob("*.y*ml") if p.is_file())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.name
        if path.parent != folder and not name.endswith((".yml", ".yaml")):
            files.other.append(path)
        elif m := LAYER_FILE.match(name):
            files.layer_files[(int(m[1]), int(m[2]))] = path
        elif m := MP_FILE.match(name):
            files.mp_files[int(m[1])] = path
        elif m := OPTIM_FILE.match(name):
            files.optim_files[(int(m[2]), int(m[3]))] = path
            files.bf16_optim_prefix = files.bf16_optim_prefix or bool(m[1])
        elif name.endswith((".yml", ".yaml")):
            files.configs.append(path)
        else:
            files.other.append(path)
    if not files.layer_files and not files.mp_files:
        raise LayoutError(
            f"{folder}: no GPT-NeoX checkpoint files (layer_XX-model_YY-model_states.pt or "
            f"mp_rank_XX_model_states.pt)"
        )
    if not files.mp_files:
        raise LayoutError(f"{folder}: missing mp_rank_00_model_states.pt (engine state)")
    _check_complete(files)
    return files


def holds_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` or its one checkpoint subfolder holds GPT-NeoX checkpoint files."""
    return _holds_checkpoint(checkpoint_root(folder))


def _holds_checkpoint(folder: Path) -> bool:
    return any(p.is_file() and (LAYER_FILE.match(p.name) or MP_FILE.match(p.name))
               for p in folder.iterdir())


def checkpoint_root(folder: Path) -> Path:
    """``folder``, or its one subfolder holding the checkpoint files (a Hub branch or an upload
    may keep them under ``global_stepN/``)."""
    if _holds_checkpoint(folder):
        return folder
    inner = [p for p in folder.iterdir() if p.is_dir() and _holds_checkpoint(p)]
    return inner[0] if len(inner) == 1 else folder


def _check_complete(files: CheckpointFiles) -> None:
    tps = files.tp_ranks
    if tps and tps != list(range(len(tps))):
        raise LayoutError(f"{files.folder}: tensor-parallel ranks {tps} are not 0..{len(tps) - 1}")
    for layer in files.layer_indices:
        missing = [tp for tp in tps if (layer, tp) not in files.layer_files]
        if missing:
            raise LayoutError(
                f"{files.folder}: layer {layer:02d} lacks tensor-parallel rank(s) {missing} "
                f"(expected layer_{layer:02d}-model_{missing[0]:02d}-model_states.pt)"
            )
    mps = sorted(files.mp_files)
    if mps != list(range(len(mps))):
        raise LayoutError(f"{files.folder}: mp_rank files {mps} are not 0..{len(mps) - 1}")
    if files.optim_files:
        top = max(dp for dp, _ in files.optim_files)
        for mp in sorted({mp for _, mp in files.optim_files}):
            missing = [dp for dp in range(top + 1) if (dp, mp) not in files.optim_files]
            if missing:
                raise LayoutError(
                    f"{files.folder}: missing {optim_file_name(missing[0], mp, files.bf16_optim_prefix)}"
                    f" (ZeRO partition files of data-parallel rank(s) {missing} are absent)"
                )
