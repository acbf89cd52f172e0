"""Inert records of pickled numpy values: a dtype and an array, turned into numpy values only
after the pickle was read (``exporter.torchfile.tree.resolve_numpy``), from checked bytes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile.records import int_tuple, short_repr


class NumpyDtype:
    """``numpy.dtype(code, align, copy)`` plus its BUILD state, turned into a numpy dtype."""

    def __init__(self, code: Any, *_: Any) -> None:
        if not isinstance(code, str) or not 0 < len(code) <= 8:
            raise UnsafePickleError(f"unsupported numpy dtype {short_repr(code, 40)}")
        self.code = code
        self.order = "|"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def resolve(self) -> np.dtype:
        order = "<" if self.order in ("|", "=") else self.order
        try:
            dtype = np.dtype(order + self.code if self.code[0].isalpha() else self.code)
        except (TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"unsupported numpy dtype {self.code!r}") from exc
        if dtype.kind not in "biufc":
            raise CheckpointFormatError(f"unsupported numpy dtype {self.code!r}")
        return dtype


class NumpyArray:
    """``numpy.core.multiarray._reconstruct`` plus the BUILD state carrying shape and bytes."""

    def __init__(self, *_: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def resolve(self) -> np.ndarray:
        # numpy/core/src/multiarray/methods.c array_setstate: (version, shape, dtype, fortran, data)
        state = self.state
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CheckpointFormatError("malformed pickled numpy array")
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, NumpyDtype):
            raise CheckpointFormatError("pickled numpy array with an unsupported dtype")
        resolved = dtype.resolve()
        shape = int_tuple(shape, "numpy array", "shape")
        if isinstance(data, str):
            data = data.encode("latin-1")
        if not isinstance(data, (bytes, bytearray)):
            raise CheckpointFormatError("pickled numpy array without raw data")
        if len(data) != math.prod(shape) * resolved.itemsize:
            raise CheckpointFormatError("pickled numpy array: data size does not match its shape")
        order = "F" if fortran else "C"
        return np.frombuffer(bytes(data), dtype=resolved).reshape(shape, order=order).copy()
