"""The exception hierarchy of neox-exporter.

Every error the package raises on bad input is an :class:`ExporterError`; the CLI turns it
into one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations


class ExporterError(Exception):
    """Base class of every error raised by neox-exporter on bad input or bad state."""


class UnsafePickleError(ExporterError):
    """A pickle asks for something the safe reader refuses to do."""


class CheckpointFormatError(ExporterError):
    """A file is not a readable torch checkpoint, or its contents are inconsistent."""


class LayoutError(ExporterError):
    """A checkpoint folder's files do not form a known GPT-NeoX / DeepSpeed layout."""


class UnsupportedModelError(LayoutError):
    """The checkpoint's model has no faithful transformers equivalent (the message names the
    GPT-NeoX setting)."""


class NameMappingError(ExporterError):
    """A GPT-NeoX parameter name has no Hugging Face counterpart (or the reverse)."""


class VerificationError(ExporterError):
    """An export does not match its source."""


class ArchiveError(ExporterError):
    """An archive is missing files, or its index disagrees with its files."""


class ArchiveLockedError(ArchiveError):
    """Another process is writing the archive (it holds the archive's lock)."""


class SourceError(ExporterError):
    """A checkpoint source (local folder, Hub repository) cannot be read."""


class PublishError(ExporterError):
    """Publishing an archive to the Hub failed."""


class OptionsError(ExporterError):
    """An option has a value the tool cannot use (the message names the option and value)."""


class CatalogError(ExporterError):
    """A catalog of runs cannot be built or read: a member refused, an unknown run."""


class IntegrityError(ArchiveError):
    """Bytes read from an archive are not the ones its index records: a digest mismatch, a
    range that came back short, or a response from another revision of the repository."""


class HashingStopped(ExporterError):
    """A background hash was told to stop: the step it served ended early (Ctrl-C, an error)."""
