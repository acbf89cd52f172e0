"""Member runs of a catalog: where an archive is, whether it changed, what run it holds.

A member is named by its archive: a local folder, or ``hf://datasets/ORG/NAME[@REVISION]``.
Its *fingerprint* says whether it changed since it was indexed without reading its index: for
a Hub archive the commit its revision resolves to, for a local one a digest of its manifest
and of the names, sizes and modification times of its index shards.

Run metadata comes from the archive's manifest (its ``source``: EleutherAI's repositories spell
size, seed and variant in the name, ``neox-ckpt-pythia-410m-seed8``,
``pythia-160m-data-seed3``) and its GPT-NeoX config (``seed``; GPT-NeoX
``megatron/neox_arguments/neox_args.py``, default 1234), and can be overridden per run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from exporter.archive.layout import (
    CHECKPOINT_INDEX_DIR,
    NEOX_CONFIG,
    TENSOR_INDEX_DIR,
    is_archive,
    manifest_path,
    step_file,
)
from exporter.archive.loader import Archive, open_archive
from exporter.archive.schema import CHECKPOINT_SCHEMA, FORMAT_VERSION, TENSOR_SCHEMA
from exporter.catalog.layout import check_run_name
from exporter.catalog.schema import schema_differences
from exporter.errors import ArchiveError, CatalogError, ExporterError
from exporter.hub.calls import RetryPolicy, hub_call

HUB_PREFIX = "hf://datasets/"
#: Prefixes of EleutherAI's repository names that say nothing about the run.
NAME_PREFIXES = ("neox-ckpt-", "pythia-")
VARIANTS = ("standard", "data-seed", "weight-seed")
#: A quick answer for a member that cannot be reached: the catalog answers from its index.
PROBE_RETRY = RetryPolicy(attempts=3, base_delay=1.0, max_delay=8.0)

_SIZE = re.compile(r"(?:^|[-_])(\d+(?:\.\d+)?[mb])(?=$|[-_])", re.IGNORECASE)
_SEED = re.compile(r"(?:^|[-_])(?:data-|weight-)?seed[-_]?(\d+)(?=$|[-_])", re.IGNORECASE)


@dataclass(frozen=True)
class MemberRef:
    """Where a member archive is: ``location`` (an absolute folder, or
    ``hf://datasets/ORG/NAME``) and the Hub revision asked for (None: ``main``)."""

    location: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> MemberRef:
        """``hf://datasets/ORG/NAME[@REVISION]`` or a local archive folder."""
        if text.startswith("hf://"):
            if not text.startswith(HUB_PREFIX):
                raise CatalogError(f"{text}: archives live in dataset repositories "
                                   "(hf://datasets/ORG/NAME[@REVISION])")
            repo, _, revision = text.removeprefix(HUB_PREFIX).strip("/").partition("@")
            if repo.count("/") != 1:
                raise CatalogError(f"{text}: expected hf://datasets/ORG/NAME[@REVISION]")
            return cls(HUB_PREFIX + repo, revision or None)
        return cls(str(Path(text).resolve()))

    @property
    def is_hub(self) -> bool:
        return self.location.startswith(HUB_PREFIX)

    @property
    def repo_id(self) -> str:
        return self.location.removeprefix(HUB_PREFIX)

    def __str__(self) -> str:
        return f"{self.location}@{self.revision}" if self.revision else self.location


def probe(ref: MemberRef, retry: RetryPolicy = PROBE_RETRY) -> tuple[str, str | None]:
    """``(fingerprint, commit)`` of a member, reading neither its index nor its tensors.

    Raises:
        ExporterError: the archive cannot be reached (the message says why).
    """
    if ref.is_hub:
        from huggingface_hub import HfApi

        info = hub_call(lambda: HfApi().repo_info(ref.repo_id, repo_type="dataset",
                                                  revision=ref.revision),
                        what=f"resolve {ref}", repo_id=ref.repo_id, policy=retry,
                        error=CatalogError)
        return f"commit:{info.sha}", str(info.sha)
    root = Path(ref.location)
    if not is_archive(root):
        raise CatalogError(f"{root}: not an archive (no manifest); was it moved or deleted?")
    digest = hashlib.sha256(manifest_path(root).read_bytes())
    for folder in (TENSOR_INDEX_DIR, CHECKPOINT_INDEX_DIR):
        for path in sorted((root / folder).glob("*.parquet")):
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return f"local:{digest.hexdigest()}", None


def open_member(ref: MemberRef, commit: str | None) -> Archive:
    """The member's archive, pinned to ``commit`` on the Hub."""
    return open_archive(ref.location, revision=commit if ref.is_hub else None)


def member_config(ref: MemberRef, commit: str | None, step: int,
                  retry: RetryPolicy = PROBE_RETRY) -> dict[str, Any]:
    """The GPT-NeoX config of one step of a member ({} when the archive has none)."""
    relative = step_file(step, NEOX_CONFIG)
    if ref.is_hub:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hub_call(lambda: hf_hub_download(ref.repo_id, relative, repo_type="dataset",
                                                         revision=commit),
                                 what=f"download {relative} of {ref}", repo_id=ref.repo_id,
                                 policy=retry, error=CatalogError))
        except CatalogError:
            return {}
    else:
        path = Path(ref.location) / relative
        if not path.is_file():
            return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class MemberTables:
    """What a catalog keeps of one member: its completed steps' index rows and manifest."""

    manifest: dict[str, Any]
    tensors: pa.Table
    checkpoints: pa.Table


def read_member(archive: Archive, label: str) -> MemberTables:
    """The member's manifest and index tables, checked against the archive schemas.

    Raises:
        CatalogError: the member disagrees with the catalog's schema (the reason named).
    """
    manifest = archive.manifest
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CatalogError(f"{label}: refused: archive format version {version}, the catalog "
                           f"holds version {FORMAT_VERSION}; rebuild it with this neox-exporter")
    steps = pa.array(archive.steps, pa.int64())
    if not len(steps):
        raise CatalogError(f"{label}: refused: the archive has no completed steps")
    tables = []
    for what, expected, read in (("tensor index", TENSOR_SCHEMA, lambda: archive.index.to_table()),
                                 ("checkpoint index", CHECKPOINT_SCHEMA,
                                  lambda: archive.checkpoints)):
        try:
            table = read()
        except pa.ArrowInvalid as exc:  # shards of different schemas do not concatenate
            raise CatalogError(f"{label}: refused: its {what} shards disagree: {exc}") from exc
        except ArchiveError as exc:  # a shard that fails the committed schema
            raise CatalogError(f"{label}: refused: {exc}") from exc
        differences = schema_differences(table.schema, expected)
        if differences:
            raise CatalogError(f"{label}: refused: its {what} differs from the catalog's schema: "
                               f"{'; '.join(differences)}")
        table = table.select(expected.names).cast(expected)
        tables.append(table.filter(pc.is_in(table["step"], steps)))
    return MemberTables(manifest, tables[0], tables[1])


def _strip_prefixes(name: str) -> str:
    for prefix in NAME_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def default_run_name(ref: MemberRef, manifest: dict[str, Any]) -> str:
    """The run's name from the member's source (``neox-ckpt-pythia-410m-seed8`` ->
    ``410m-seed8``), else from the archive's own name."""
    for text in (str(manifest.get("source") or ""), ref.location):
        base = _strip_prefixes(text.rstrip("/").split("/")[-1].split("@")[0])
        if base:
            return base
    raise CatalogError(f"{ref}: cannot name its run; give one with --run {ref}=run=NAME")


def format_parameters(count: int) -> str:
    """A Pythia-style size label: 405_334_016 -> ``405m``, 1_011_781_632 -> ``1.0b``."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}b"
    if count >= 1_000_000:
        return f"{count / 1e6:.0f}m"
    return f"{count / 1e3:.0f}k"


def model_parameters(tensors: pa.Table) -> int | None:
    """Parameters of the model at the first indexed step (None without model tensors)."""
    model = tensors.filter(pc.equal(tensors["kind"], "model"))
    if not model.num_rows:
        return None
    first = model.filter(pc.equal(model["step"], pc.min(model["step"])))
    return int(pc.sum(first["numel"]).as_py())


def run_metadata(name: str, source: str, config: dict[str, Any],
                 parameters: int | None) -> dict[str, Any]:
    """``model_size``, ``seed`` and ``variant`` of a run, from its names and config."""
    names = [name, source.rstrip("/").split("/")[-1]]
    size = next((m[1].lower() for n in names if (m := _SIZE.search(n))), None)
    if size is None and parameters is not None:
        size = format_parameters(parameters)
    seed_match = next((m for n in names if (m := _SEED.search(n))), None)
    seed: int | None = int(seed_match[1]) if seed_match else None
    if seed is None and isinstance(config.get("seed"), int):
        seed = int(config["seed"])
    joined = " ".join(names).lower()
    variant = next((v for v in VARIANTS[1:] if v in joined), "standard")
    return {"model_size": size, "seed": seed, "variant": variant}


#: Fields ``--run NAME=FIELD=VALUE,...`` may set.
OVERRIDABLE = ("run", "model_size", "seed", "variant")


def parse_override(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=field=value[,field=value]`` -> (NAME, {field: value}).

    Example:
        >>> parse_override("410m-seed8=seed=8,variant=data-seed")
        ('410m-seed8', {'seed': 8, 'variant': 'data-seed'})
    """
    key, sep, rest = text.partition("=")
    if not sep or not key or not rest:
        raise CatalogError(f"--run {text!r}: expected NAME=FIELD=VALUE[,FIELD=VALUE] (fields: "
                           f"{', '.join(OVERRIDABLE)}), e.g. --run 410m-seed8=seed=8")
    fields: dict[str, Any] = {}
    for item in rest.split(","):
        field, sep, value = item.partition("=")
        field = field.strip()
        if not sep or field not in OVERRIDABLE:
            raise CatalogError(f"--run {text!r}: {item!r} is not FIELD=VALUE with FIELD one of "
                               f"{', '.join(OVERRIDABLE)}")
        if field == "seed":
            try:
                fields[field] = int(value)
            except ValueError:
                raise CatalogError(f"--run {text!r}: seed must be an integer, got {value!r}") from None
        elif field == "run":
            fields[field] = check_run_name(value.strip())
        else:
            fields[field] = value.strip() or None
    return key, fields


def reachable(ref: MemberRef) -> str | None:
    """None when the member can be reached, else why not (one line)."""
    try:
        probe(ref, RetryPolicy(attempts=1))
    except (ExporterError, OSError) as exc:
        return str(exc)
    return None

