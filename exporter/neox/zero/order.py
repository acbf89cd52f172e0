"""Which data-parallel partition files of a unit to read first, and which alike: hints from
the zip files' directories (:mod:`exporter.torchfile.peek`), never proofs (the reader checks
each file as it reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.torchfile.peek import pickle_signature

if TYPE_CHECKING:
    from exporter.neox.checkpoint import CheckpointFiles


def reading_order(paths: list[Any]) -> list[int]:
    """The indices of ``paths``, a file of the pickle most of them have first (read in full,
    the others are rebuilt from it with the fewest changes), then the others in order."""
    signatures = [pickle_signature(Path(path)) for path in paths]
    counts = {s: signatures.count(s) for s in signatures if s is not None}
    if not counts:
        return list(range(len(paths)))
    first = signatures.index(max(counts, key=counts.__getitem__))
    return [first, *(i for i in range(len(paths)) if i != first)]


def odd_files(paths: list[Any], files: CheckpointFiles) -> list[int]:
    """The indices in ``paths`` (:func:`shared_files`) of the partition files whose pickle is
    not the one most files of their unit have, as their zip directories record it
    (:func:`~exporter.torchfile.peek.pickle_signature`), alike ones together: the forked
    reader reads them first, and this process the others, each pickle read in full once
    (:mod:`exporter.torchfile.repeats`). Ranks whose partitions have another size (the last
    one's padding) have another pickle."""
    unit = {Path(path): mp for (_, mp), path in files.optim_files.items()}
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, path in enumerate(paths):
        signature = pickle_signature(Path(path))
        key = (unit.get(Path(path)), signature if signature is not None else i)
        groups.setdefault(key, []).append(i)
    largest: dict[Any, list[int]] = {}
    for (mp, _), members in groups.items():
        if len(members) > len(largest.get(mp, ())):
            largest[mp] = members
    return [i for (mp, _), members in groups.items() if members is not largest[mp]
            for i in members]
