"""Progress bars for long work (tqdm), silent when disabled or not on a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

# No monitor thread (it only closes bars that stalled): a process running one thread can fork a
# reader of partition files (exporter.torchfile.forked).
tqdm.monitor_interval = 0


def step_bar(total: int, done: int, disable: bool = False) -> tqdm:
    """A bar over a build's steps, ``done`` of ``total`` complete already."""
    return tqdm(total=total, initial=done, desc="steps", unit="step",
                disable=True if disable else None, dynamic_ncols=True)


@contextmanager
def byte_bar(label: str, total: int | None = None, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar over bytes; yields the function to call with each increment."""
    # disable=None: tqdm stays silent when stderr is not a terminal (logs, CI).
    # unit_divisor=1000: the bar counts GB as the summaries do (not GiB).
    bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1000,
               disable=True if disable else None, leave=False, dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()
