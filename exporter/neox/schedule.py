"""The learning rate of a checkpoint where the files do not store it.

Current DeepSpeed saves a torch optimizer ``state_dict`` whose ``param_groups`` hold ``lr``.
The Pythia-era elastic ZeRO files do not, and GPT-NeoX's ``AnnealingLR``
(``megatron/learning_rates.py``) saves its settings and ``num_iters``, not its value
(``state_dict``: ``start_lr``, ``warmup_iter``, ``num_iters``, ``decay_style``, ``end_iter``,
``min_lr``). Its ``step`` sets every group's ``lr`` to ``get_lr()`` after updating
``num_iters``, so the value the optimizer held at the save is ``get_lr()`` of the saved state.

``get_lr`` changed in August-September 2023 (gpt-neox 009018e9, eda5aae4, 390d37cc, e431ff54):
before, the iteration count is clipped to ``end_iter - warmup_iter`` and the decays run over
``end_iter`` with cosine ignoring ``min_lr`` but for the final ``max``; after, decays run over
``end_iter - warmup_iter`` and cosine starts from ``min_lr``. Both are here; the caller picks by
the checkpoint's era, and the result says which formula gave it.
"""

from __future__ import annotations

import math
from typing import Any

FORMULAS = {
    "2022": "GPT-NeoX AnnealingLR.get_lr as of 2022 (Pythia era, gpt-neox d7af1e7a)",
    "2023": "GPT-NeoX AnnealingLR.get_lr since 2023-09 (gpt-neox e431ff54)",
}


def annealing_lr(state: dict[str, Any], formula: str) -> float:
    """``AnnealingLR.get_lr()`` for a saved ``AnnealingLR.state_dict()``.

    Raises:
        KeyError, TypeError, ValueError: the state lacks a setting or holds a non-number.
    """
    start = float(state["start_lr"] if "start_lr" in state else state["max_lr"])
    min_lr = float(state.get("min_lr") or 0.0)
    warmup = float(state["warmup_iter"])
    end = float(state["end_iter"])
    iters = float(state["num_iters"])
    style = state.get("decay_style")
    if formula == "2022":
        clipped = min(iters, end - warmup)
        if warmup > 0 and iters <= warmup:
            return start * clipped / warmup
        n = clipped - warmup
        span = end
        if style == "cosine":
            lr = start / 2.0 * (math.cos(math.pi * n / span) + 1)
            return max(lr, min_lr)
    elif formula == "2023":
        if warmup > 0 and iters <= warmup:
            return start * iters / warmup
        n = iters - warmup
        span = end - warmup
        if style == "cosine":
            lr = min_lr + (start - min_lr) / 2.0 * (math.cos(math.pi * n / span) + 1)
            return max(lr, min_lr)
    else:
        raise ValueError(f"unknown AnnealingLR formula {formula!r}")
    if style == "linear":
        lr = start * (span - n) / span
    elif style == "exponential":
        lr = start * math.exp(-0.693 * n / span)
    else:
        lr = start
    return max(lr, min_lr)


def derived_learning_rate(scheduler: Any, formula: str) -> tuple[float | None, str]:
    """(learning rate, how it was obtained) from the engine's saved ``lr_scheduler``."""
    if not isinstance(scheduler, dict):
        return None, "not stored (no optimizer param_groups lr, no lr_scheduler state)"
    try:
        lr = annealing_lr(scheduler, formula)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None, "not stored (lr_scheduler state is not GPT-NeoX's AnnealingLR)"
    return lr, (f"derived: {FORMULAS[formula]} of lr_scheduler num_iters="
                f"{scheduler.get('num_iters')}")
