"""Paths and JSON that come from archive content: checked before anything is opened.

An archive is data someone else wrote (a Hub dataset, a folder passed around a lab). Every
path it names (index ``file`` columns, checkpoint-index ``output_files``, manifest entries,
``model.safetensors.index.json`` weight maps, ``.push/`` records) is a *relative* path that
must stay inside the archive root:

- lexically (:func:`check_relative`): forward slashes only, no ``..`` or ``.`` segment, no
  empty segment, not absolute, no control characters, nothing under ``.git``;
- on disk (:func:`resolve_inside`): after following symlinks, the file is still below the
  root, and not below the root's ``.git``;
- on the Hub (:func:`inside_hub_cache`): the file ``hf_hub_download`` hands back lies in the
  cache folder of the repository that was asked for, never in another repository's.

JSON files of an archive are read with :func:`read_json`: bounded in size and nesting, and
every failure an :class:`~exporter.errors.ArchiveError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from exporter.archive.layout import CONFIG
from exporter.errors import ArchiveError

#: longest relative path accepted (Linux PATH_MAX)
MAX_PATH = 4096
#: largest JSON file of an archive read whole (manifest.json, weight maps, .push records)
MAX_JSON_BYTES = 64 << 20
#: path segments that never name archive content: git's own store
FORBIDDEN_SEGMENTS = frozenset({".git"})
# C0 and C1 control characters, DEL, and Unicode bidi controls (they reorder what a terminal
# or a Markdown viewer shows: "Trojan Source", CVE-2021-42574).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def check_relative(relative: object, what: str) -> str:
    """``relative`` as a path inside an archive, or an :class:`ArchiveError` naming ``what``.

    Only what the archive layout (DESIGN.md "Archive layout") can hold passes: a non-empty
    string of ``/``-separated names, none of them empty, ``.``, ``..`` or ``.git``; not absolute
    (no leading ``/``, no drive letter); no backslash and no control character.

    Example:
        >>> check_relative("steps/step8/model.safetensors", "index row 0")
        'steps/step8/model.safetensors'
        >>> check_relative("../../etc/passwd", "index row 0")
        Traceback (most recent call last):
        ...
        exporter.errors.ArchiveError: index row 0: path '../../etc/passwd' leaves the archive ('..')
    """
    if not isinstance(relative, str) or not relative:
        raise ArchiveError(f"{what}: path {relative!r} is not a relative path")
    if len(relative) > MAX_PATH:
        raise ArchiveError(f"{what}: path of {len(relative)} characters (at most {MAX_PATH})")
    if _CONTROL.search(relative):
        raise ArchiveError(f"{what}: path {relative!r} holds control characters")
    if "\\" in relative:
        raise ArchiveError(f"{what}: path {relative!r} holds a backslash")
    if relative.startswith("/") or _DRIVE.match(relative):
        raise ArchiveError(f"{what}: path {relative!r} is absolute")
    for segment in relative.split("/"):
        if segment == "..":
            raise ArchiveError(f"{what}: path {relative!r} leaves the archive ('..')")
        if segment in ("", "."):
            raise ArchiveError(f"{what}: path {relative!r} has an empty or '.' segment")
        if segment.lower() in FORBIDDEN_SEGMENTS:
            raise ArchiveError(f"{what}: path {relative!r} points into {segment}")
    return relative


def _is_below(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def resolve_inside(root: str | os.PathLike[str], relative: object, what: str) -> Path:
    """The real path of ``root/relative``, refused unless it stays inside ``root``.

    Symlinks are followed (``os.path.realpath``): a link anywhere on the way that leads out
    of the root, or into the root's ``.git``, is refused. The file need not exist.

    Args:
        root: the archive folder.
        relative: a path read from the archive (checked with :func:`check_relative`).
        what: names the place the path came from in errors (``index/tensors/step8.parquet
            row 3``).

    Raises:
        ArchiveError: the path is malformed or leads outside the archive.
    """
    relative = check_relative(relative, what)
    base = os.path.realpath(root)
    try:
        real = os.path.realpath(os.path.join(base, relative), strict=True)
    except FileNotFoundError:
        real = os.path.realpath(os.path.join(base, relative))  # a file yet to be written
    except OSError as exc:  # a symlink loop (ELOOP), or a file in the way of a folder
        raise ArchiveError(f"{what}: path {relative!r} cannot be resolved: "
                           f"{exc.strerror or exc}") from exc
    if not _is_below(real, base):
        raise ArchiveError(f"{what}: path {relative!r} leads outside the archive "
                           "(through a symbolic link)")
    inside = Path(real).relative_to(base).parts
    if any(part.lower() in FORBIDDEN_SEGMENTS for part in inside):
        raise ArchiveError(f"{what}: path {relative!r} leads into .git")
    return Path(real)


def inside_hub_cache(downloaded: str | os.PathLike[str], relative: str, repo_folder: str,
                     what: str) -> Path:
    """Check a file ``hf_hub_download`` returned for ``relative`` against its repository.

    huggingface_hub stores a download as ``<cache>/<repo_folder>/snapshots/<commit>/<relative>``,
    a symlink into ``<cache>/<repo_folder>/blobs/`` (``file_download.py``,
    ``_hf_hub_download_to_cache_dir``). The returned path must have exactly that shape, and
    its target must lie in the same repository folder, never in another repository's.

    Args:
        downloaded: what ``hf_hub_download`` returned.
        relative: the path asked for (already checked with :func:`check_relative`).
        repo_folder: ``huggingface_hub.file_download.repo_folder_name`` of the repository.
        what: names the path's origin in errors.
    """
    path = Path(downloaded)
    depth = len(Path(relative).parts) + 2  # snapshots/<commit>/<relative>
    storage = path.parents[depth - 1] if len(path.parents) >= depth else None
    if (storage is None or storage.name != repo_folder
            or path.relative_to(storage).as_posix().split("/", 2)[-1] != relative):
        raise ArchiveError(f"{what}: {relative!r} was not downloaded into the cache of "
                           f"{repo_folder}")
    real = os.path.realpath(path)
    if not _is_below(real, os.path.realpath(storage)):
        raise ArchiveError(f"{what}: {relative!r} leads outside the cache of {repo_folder}")
    return Path(real)


def read_json(path: str | os.PathLike[str], label: str,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of an archive: at most ``max_bytes``, nesting bounded by Python's
    recursion limit, any failure an :class:`ArchiveError` naming ``label``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ArchiveError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ArchiveError(f"{label}: larger than {max_bytes} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ArchiveError(f"{label}: not valid JSON: {reason}") from exc


def check_model_folder(root: str | os.PathLike[str], folder: str, label: str) -> Path:
    """Refuse a step folder that would make ``from_pretrained`` read outside the archive.

    transformers reads ``config.json`` and ``model.safetensors`` from the folder, or the
    shards that ``model.safetensors.index.json`` names in its ``weight_map``, each joined to
    the folder (``modeling_utils.py``, ``_get_resolved_checkpoint_files``). The folder, those
    files and every shard name must resolve inside ``root``; a shard name is a plain file
    name beside the index, as transformers writes it (``save_pretrained``).

    Args:
        root: the archive folder (for a Hub download: the repository's cache folder).
        folder: the step folder, relative to ``root``.
        label: names the archive in errors.

    Returns:
        The real path of the folder.
    """
    real = resolve_inside(root, folder, label)
    if not real.is_dir():
        return real
    for entry in sorted(real.iterdir()):
        if entry.name == CONFIG or entry.name.startswith("model"):
            resolve_inside(root, f"{folder}/{entry.name}", label)
    index = real / "model.safetensors.index.json"
    if index.exists():
        where = f"{label}/{folder}/model.safetensors.index.json"
        data = read_json(index, where)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ArchiveError(f"{where}: no weight_map object")
        for name, file in weight_map.items():
            what = f"{where}: weight_map[{name!r}]"
            if "/" in check_relative(file, what):
                raise ArchiveError(f"{what}: {file!r} is not a file beside the index")
            resolve_inside(root, f"{folder}/{file}", what)
    return real
