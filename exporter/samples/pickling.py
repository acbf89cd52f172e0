"""``torch.save`` that names the globals a Pythia-era checkpoint names, without importing them.

Optimizer files of that era pickle the loss scaler object (DeeperSpeed eb7f5cff
``deepspeed/runtime/zero/stage1.py`` ``_elastic_state_dict``: ``state_dict['loss_scaler']``), so
their pickle names ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler`` (or ``LossScaler``).
numpy 1.x wrote ``numpy.core.multiarray._reconstruct`` for arrays (the rng state in mp_rank
files). Here a pure-Python pickler writes those names for local stand-in objects, so neither
deepspeed nor an old numpy is imported and no module table is touched.
"""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

_LOSS_SCALER_MODULE = "deepspeed.runtime.fp16.loss_scaler"
# numpy >= 2 reduces arrays with numpy._core.multiarray._reconstruct; numpy 1.x, which wrote the
# Pythia files, named numpy.core.multiarray._reconstruct. Both resolve when loading today.
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]


class LossScaler:
    """Stand-in for DeeperSpeed's static ``LossScaler``: same pickled name and attributes.

    Attributes follow ``deepspeed/runtime/fp16/loss_scaler.py`` at eb7f5cff: ``LossScalerBase``
    sets ``cur_scale`` only. bf16 runs use it with scale 1.0 (``config.py`` ``get_loss_scale``).
    """

    pickle_global = (_LOSS_SCALER_MODULE, "LossScaler")

    def __init__(self, scale: float = 1.0) -> None:
        self.cur_scale = scale

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """A static scale never changes."""


class DynamicLossScaler:
    """Stand-in for DeeperSpeed's ``DynamicLossScaler``: same pickled name, attributes, rule.

    Attribute order and meaning follow ``deepspeed/runtime/fp16/loss_scaler.py`` at eb7f5cff;
    GPT-NeoX's fp16 block maps to them via ``config.py`` ``get_dynamic_loss_scale_args``
    (``init_scale = 2**initial_scale_power``, ``scale_window = loss_scale_window``,
    ``delayed_shift = hysteresis``, ``min_scale = min_loss_scale``).
    """

    pickle_global = (_LOSS_SCALER_MODULE, "DynamicLossScaler")

    def __init__(
        self,
        init_scale: float = 2**32,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_scale: float = 1,
        delayed_shift: int = 1,
        consecutive_hysteresis: bool = False,
        raise_error_at_min_scale: bool = True,
    ) -> None:
        self.cur_scale = init_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.delayed_shift = delayed_shift
        self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """Advance one iteration: shrink on overflow (after hysteresis), grow every window."""
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


def _legacy_name(obj: Any) -> tuple[str, str] | None:
    if obj is _NUMPY_RECONSTRUCT:
        return ("numpy.core.multiarray", "_reconstruct")
    if isinstance(obj, type) and issubclass(obj, LossScaler | DynamicLossScaler):
        return obj.pickle_global
    return None


def _pickle_module(storage_location: str | None) -> types.ModuleType:
    """A pickle-module stand-in for ``torch.save(pickle_module=...)``."""

    class LegacyPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
        def save_global(self, obj: Any, name: str | None = None) -> None:
            legacy = _legacy_name(obj)
            if legacy is None:
                super().save_global(obj, name)
                return
            self.write(pickle.GLOBAL + f"{legacy[0]}\n{legacy[1]}\n".encode("ascii"))
            self.memoize(obj)

        def save_pers(self, pid: Any) -> None:
            # torch.save's persistent id: ("storage", type, key, location, numel). Files written
            # on GPUs carry "cuda:N" here; rewrite the tag to mimic them.
            if storage_location is not None and isinstance(pid, tuple) and pid[0] == "storage":
                pid = (*pid[:3], storage_location, *pid[4:])
            super().save_pers(pid)

    module = types.ModuleType("pickle")
    module.Pickler = LegacyPickler  # type: ignore[attr-defined]
    return module


def save_legacy(obj: Any, path: Path, *, storage_location: str | None = None) -> None:
    """``torch.save`` with Pythia-era global names, written to a temporary name then renamed.

    ``storage_location`` (e.g. ``"cuda:3"``) replaces the storages' location tag; ``None``
    keeps torch's own (``"cpu"``).
    """
    # torch names the zip's top folder after the file's stem, so the temporary file keeps the
    # final name inside a temporary folder.
    tmp_dir = path.with_name(f".{path.name}.partial")
    tmp_dir.mkdir(exist_ok=True)
    tmp = tmp_dir / path.name
    torch.save(obj, tmp, pickle_module=_pickle_module(storage_location), pickle_protocol=2)
    os.replace(tmp, path)
    tmp_dir.rmdir()
