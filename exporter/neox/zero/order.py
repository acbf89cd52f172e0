"""Which data-parallel partition files of a unit to read first, which alike, and which a
forked reader reads: hints from the zip files' directories (:mod:`exporter.torchfile.peek`),
never proofs (the reader checks each file as it reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.torchfile.patched import MAX_SITES
from exporter.torchfile.peek import pickle_signature, pickle_size

#: A pickle whose size is within this many bytes of its unit's common one is taken for that
#: one with numbers changed (at most ``MAX_SITES``, each 1, 2 or 4 bytes wide, so a few bytes
#: longer or shorter), rebuilt from it rather than read in full: a hint, which the rebuild
#: proves or refuses (the file is then read in full).
PATCH_SLACK = MAX_SITES * 3

if TYPE_CHECKING:
    from exporter.neox.checkpoint import CheckpointFiles


def reading_order(paths: list[Any]) -> list[int]:
    """The indices of ``paths``: the files of the pickle most of them have first (the first
    read in full, the others rebuilt from it with the fewest changes, each zip's directory
    compared with the last one's: :mod:`exporter.torchfile.likezip`), then the others in
    order."""
    signatures = [pickle_signature(Path(path)) for path in paths]
    counts = {s: signatures.count(s) for s in signatures if s is not None}
    if not counts:
        return list(range(len(paths)))
    common = max(counts, key=counts.__getitem__)
    alike = [i for i, s in enumerate(signatures) if s == common]
    return [*alike, *(i for i, s in enumerate(signatures) if s != common)]


def odd_files(paths: list[Any], files: CheckpointFiles) -> list[int]:
    """The indices in ``paths`` (:func:`shared_files`) of the partition files whose pickle is
    not the one most files of their unit have, as their zip directories record it
    (:func:`~exporter.torchfile.peek.pickle_signature`), alike ones together: each is read in
    full once (:mod:`exporter.torchfile.repeats`). A pickle within :data:`PATCH_SLACK` bytes
    of the common one's size is taken for that one with numbers changed, which is rebuilt
    from it (ranks whose partitions have another size, the last one's padding:
    :mod:`exporter.torchfile.patched`), not as odd."""
    unit = {Path(path): mp for (_, mp), path in files.optim_files.items()}
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, path in enumerate(paths):
        signature = pickle_signature(Path(path))
        key = (unit.get(Path(path)), signature if signature is not None else i)
        groups.setdefault(key, []).append(i)
    largest: dict[Any, tuple[Any, list[int]]] = {}
    for (mp, signature), members in groups.items():
        if len(members) > len(largest.get(mp, (None, ()))[1]):
            largest[mp] = (signature, members)
    odd = []
    for (mp, signature), members in groups.items():
        common, most = largest[mp]
        if members is most or _patched(signature, common):
            continue
        odd += members
    return odd


def child_share(paths: list[Any], files: CheckpointFiles) -> list[int] | None:
    """The indices in ``paths`` (:func:`shared_files`, each unit's files in
    :func:`reading_order`) that a forked reader reads first, or None where it would read
    nothing this process does not read cheaper: each unit's :func:`odd_files` (read in full
    there while this process reads the unit's common pickle), then the files of every second
    unit (read there while this process reads the unit before: each unit's pickle read in
    full once, by one process)."""
    odd = odd_files(paths, files)
    unit = {Path(path): mp for (_, mp), path in files.optim_files.items()}
    units = sorted({unit.get(Path(path), -1) for path in paths})
    taken = set(odd)
    theirs = [i for mp in units[1::2] for i, path in enumerate(paths)
              if unit.get(Path(path), -1) == mp and i not in taken]
    return odd + theirs if odd or theirs else None


def _patched(signature: Any, common: Any) -> bool:
    """Whether a pickle of ``signature`` is within :data:`PATCH_SLACK` bytes of the size of
    one of ``common`` (both as :func:`~exporter.torchfile.peek.pickle_signature` gives)."""
    size, other = pickle_size(signature), pickle_size(common)
    return size is not None and other is not None and abs(size - other) <= PATCH_SLACK
