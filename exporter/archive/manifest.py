"""``manifest.json``: format version, tool, source, options, completed and failed steps.

Only the process coordinating a build writes it, after each step, atomically, and only when
something other than its ``updated`` time changed: a no-op rerun leaves the file as it was, so
pushing it again makes no Hub commit (the Hub allows about 128 commits per hour).
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from exporter import __version__
from exporter.archive.layout import manifest_path
from exporter.archive.schema import FORMAT_VERSION
from exporter.errors import ExporterError
from exporter.files import write_json_atomic
from exporter.records import StepOutcome


class Manifest:
    """``manifest.json``: format version, source, options, completed and failed steps."""

    def __init__(self, root: Path, source: str, options: dict[str, Any]) -> None:
        """Open (or start) the manifest of the archive at ``root`` built from ``source`` with
        ``options`` (:meth:`exporter.pipeline.export.ExportOptions.manifest_entry`); an existing
        manifest of another source or other options is refused."""
        self.path = manifest_path(root)
        self.data: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "tool": {"name": "neox-exporter", "version": __version__},
            "source": source,
            "options": options,
            "steps": {},
            "failed": {},
        }
        self._saved: dict[str, Any] | None = None  # the file's content, less ``updated``
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ExporterError(f"{self.path}: unreadable manifest: {exc}") from exc
            if old.get("source") not in (None, source):
                raise ExporterError(
                    f"{self.path}: archive was built from {old.get('source')!r}, not {source!r}"
                )
            if old.get("options") and old["options"] != self.data["options"]:
                raise ExporterError(
                    f"{self.path}: archive was built with options {old['options']}, now "
                    f"{self.data['options']}; use a new --out folder"
                )
            self.data["steps"] = old.get("steps", {})
            self.data["failed"] = old.get("failed", {})
            self._saved = copy.deepcopy({k: v for k, v in old.items() if k != "updated"})

    def record(self, outcome: StepOutcome) -> None:
        key = str(outcome.step)
        if outcome.status == "failed":
            self.data["failed"][key] = {"error": outcome.error or "unknown error"}
            self.data["steps"].pop(key, None)
        else:
            self.data["failed"].pop(key, None)
            if outcome.status == "done" or key not in self.data["steps"]:
                self.data["steps"][key] = {
                    "tensors": outcome.tensors,
                    "bytes_out": outcome.bytes_out,
                    "files": outcome.files,
                    "source_revision": outcome.revision,
                }
        self.save()

    def save(self) -> None:
        """Write the manifest, stamped with the time, unless only the stamp would change."""
        self.data["steps"] = dict(sorted(self.data["steps"].items(), key=lambda kv: int(kv[0])))
        self.data["failed"] = dict(sorted(self.data["failed"].items(), key=lambda kv: int(kv[0])))
        content = {k: v for k, v in self.data.items() if k != "updated"}
        if content == self._saved:
            return
        self.data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_json_atomic(self.path, self.data)
        self._saved = copy.deepcopy(content)
