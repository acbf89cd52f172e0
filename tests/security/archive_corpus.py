"""The whole corpus of hostile archives: every case of every family, by name."""

from __future__ import annotations

from security import hostile_headers, hostile_paths, hostile_tables
from security.hostile_archives import CASES

FAMILY_MODULES = (hostile_paths, hostile_headers, hostile_tables)
__all__ = ["CASES", "FAMILY_MODULES"]

if __name__ == "__main__":
    for c in CASES.values():
        print(f"{c.family:<11} {c.name:<45} {c.refused or 'reads, shown as text'}")
