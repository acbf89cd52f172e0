"""What a build did: one outcome per step, totals, and the table the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from exporter.records import StepOutcome, StepStatus

if TYPE_CHECKING:
    from exporter.hub.publish import PushResult


@dataclass
class BuildSummary:
    """One outcome per step, the wall time, what a push did (``push_to``), and the most disk
    the build reserved at once (``max_disk`` accounting)."""

    outcomes: list[StepOutcome]
    seconds: float
    push: PushResult | None = None
    peak_disk: int = 0

    def count(self, status: StepStatus) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def bytes_in(self) -> int:
        return sum(o.bytes_in for o in self.outcomes if o.status == "done")

    @property
    def bytes_out(self) -> int:
        return sum(o.bytes_out for o in self.outcomes if o.status == "done")

    def table(self) -> str:
        done = [o for o in self.outcomes if o.status == "done"]
        rate = self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else 0.0
        lines = [
            f"{'steps done':<16}{len(done)}",
            f"{'steps skipped':<16}{self.count('skipped')} (already complete)",
            f"{'steps failed':<16}{self.count('failed')}",
            f"{'tensors':<16}{sum(o.tensors for o in done)}",
            f"{'GB in':<16}{self.bytes_in / 1e9:.3f}",
            f"{'GB out':<16}{self.bytes_out / 1e9:.3f}",
            f"{'GB/s (in)':<16}{rate:.3f}",
            f"{'time':<16}{self.seconds:.1f} s",
        ]
        for o in self.outcomes:
            if o.status == "failed":
                lines.append(f"failed step {o.step}: {o.error}")
        return "\n".join(lines)
