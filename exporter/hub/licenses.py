"""The ``license`` of a published archive: one of the Hub's identifiers, by default the source's.

:data:`HUB_LICENSES` is the table the Hub documents for the ``license`` field of repository
cards (hub-docs ``docs/hub/repositories-licenses.md``, the "licenses" region, with the Llama 3.x
identifiers of hub-docs PR #1619). A card with any other value is not recognised by the Hub; a
license it does not list is ``other`` (with ``license_name`` and a LICENSE file).
"""

from __future__ import annotations

import difflib
import logging

from exporter.errors import OptionsError

log = logging.getLogger(__name__)

HUB_LICENSES: tuple[str, ...] = (
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m",
    "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0",
    "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0",
    "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0",
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0",
    "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1", "agpl-3.0", "gfdl", "gpl", "gpl-2.0",
    "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by",
    "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
    "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3",
    "gemma", "unknown", "other",
)

#: The card's license when neither the user nor the source says (the Hub's own word for it).
UNKNOWN = "unknown"


def check_license(license_id: str) -> str:
    """``license_id`` if the Hub knows it; an OptionsError naming the closest ones otherwise.

    Example:
        >>> check_license("apache-2.0")
        'apache-2.0'
    """
    if license_id in HUB_LICENSES:
        return license_id
    lowered = license_id.strip().lower()
    if lowered in HUB_LICENSES:
        return lowered
    close = difflib.get_close_matches(lowered, HUB_LICENSES, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise OptionsError(
        f"{license_id!r} is not a Hub license identifier; {hint}use one of the Hub's list "
        f"(https://huggingface.co/docs/hub/repositories-licenses), e.g. apache-2.0, mit, "
        f"cc-by-4.0, or 'other'")


def source_license(source: str, token: str | None = None) -> str | None:
    """The license in the card of a Hub source (``hf://ORG/NAME``), or None when unknown.

    A local source, a repository without a card, a card without a (known) license, or a Hub
    that cannot be reached all give None: the caller falls back to :data:`UNKNOWN`, saying so.
    """
    if not source.startswith("hf://"):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.repocard import metadata_load

    repo = source.removeprefix("hf://").split("@")[0].strip("/")
    repo_type = "model"
    for plural, kind in (("datasets/", "dataset"), ("models/", "model")):
        if repo.startswith(plural):
            repo, repo_type = repo.removeprefix(plural), kind
    try:
        card = hf_hub_download(repo, "README.md", repo_type=repo_type, token=token)
        metadata = metadata_load(card) or {}
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        log.warning("could not read the license of %s: %s", source, str(exc).splitlines()[0])
        return None
    found = metadata.get("license")
    return found if isinstance(found, str) and found in HUB_LICENSES else None


def default_license(source: str, token: str | None = None) -> tuple[str, str]:
    """The card's license when none is given, and where it came from (for a message): the
    source model's (:func:`source_license`), else :data:`UNKNOWN`.

    Args:
        source: the archive's source, as its manifest records it.
        token: Hub token for reading the source's card.
    """
    found = source_license(source, token)
    if found is not None:
        return found, f"the card of {source}"
    return UNKNOWN, f"no license known for {source}; pass --license"
