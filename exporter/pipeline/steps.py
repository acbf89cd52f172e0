"""Step selections: ``all``, ``log``, lists and ``start:stop:stride`` ranges.

Pythia's checkpoints are steps 0, the log-spaced 1, 2, 4, ..., 512, then every 1000 up to
143000 (EleutherAI/pythia README, "Checkpoints"); ``log`` selects the log-spaced early ones
(0 and the powers of two) among those a source holds.
"""

from __future__ import annotations

import re

from exporter.errors import ExporterError, OptionsError

_RANGE = re.compile(r"^(\d+)?:(\d+)?(?::(\d+))?$")


def parse_steps(spec: str | None, available: list[int]) -> list[int]:
    """The steps of ``available`` selected by ``spec``, ascending.

    ``spec`` is a comma-separated list of items, each ``all``, ``log``, a step number, or a
    range ``start:stop[:stride]`` (stop inclusive, like Pythia's ``1000:143000:1000``).

    Raises:
        ExporterError: a malformed item, or a listed step the source does not hold.
    """
    have = sorted(set(available))
    if spec is None or spec.strip() in ("", "all"):
        return have
    chosen: set[int] = set()
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item == "all":
            chosen.update(have)
        elif item == "log":
            chosen.update(s for s in have if s == 0 or (s & (s - 1)) == 0)
        elif item.isdigit():
            step = int(item)
            if step not in have:
                raise ExporterError(f"step {step} is not in the source (it holds {_describe(have)})")
            chosen.add(step)
        elif m := _RANGE.match(item):
            start = int(m[1]) if m[1] else (have[0] if have else 0)
            stop = int(m[2]) if m[2] else (have[-1] if have else 0)
            stride = int(m[3]) if m[3] else 1
            if stride <= 0:
                raise ExporterError(f"step range {item!r}: stride must be positive")
            chosen.update(s for s in have if start <= s <= stop and (s - start) % stride == 0)
        else:
            raise ExporterError(
                f"cannot read step selection {item!r} (use all, log, 1000, or 1000:143000:1000)"
            )
    return sorted(chosen)


def check_step_spec(spec: str | None) -> None:
    """Raise :class:`OptionsError` naming the first malformed item of a step selection."""
    for item in (part.strip() for part in (spec or "").split(",")):
        if not item or item in ("all", "log") or item.isdigit():
            continue
        m = _RANGE.match(item)
        if m is None:
            raise OptionsError(
                f"steps: cannot read {item!r} (use all, log, 1000, or 1000:143000:1000)"
            )
        if m[3] is not None and int(m[3]) <= 0:
            raise OptionsError(f"steps: range {item!r}: stride must be positive")


def _describe(steps: list[int]) -> str:
    if not steps:
        return "no steps"
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{len(steps)} steps, {steps[0]}..{steps[-1]}"
