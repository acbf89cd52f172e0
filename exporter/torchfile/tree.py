"""Walking an unpickled object tree: resolve numpy records, find tensors, render JSON.

Pickles can share one object under many references (memo) and even build cycles, so every
walk here tracks what it has seen and has a budget: a small pickle must not expand into an
exponential tree.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from exporter.dtypes import DType
from exporter.errors import CheckpointFormatError
from exporter.torchfile.numpy_records import NumpyArray, NumpyDtype
from exporter.torchfile.records import PickledObject, TensorRef
from exporter.torchfile.runs import RecordRun

MAX_NODES = 5_000_000
MAX_DEPTH = 200
#: Elements rendered again because a container is referenced more than once.
MAX_REPEATED = 100_000
#: Longest dotted key path of a tensor, and all of them together: a long key above many
#: tensors would otherwise be copied into every tensor's path.
MAX_PATH = 4096
MAX_PATHS_TOTAL = 64 << 20


class _Budget:
    def __init__(self, limit: int, message: str = "object tree too large (shared references "
                 "expand too far)") -> None:
        self.left = limit
        self.message = message

    def spend(self, amount: int = 1) -> None:
        self.left -= amount
        if self.left < 0:
            raise CheckpointFormatError(self.message)


def resolve_numpy(obj: Any) -> Any:
    """Replace numpy records by numpy values, in place where possible; returns the new root."""
    done: dict[int, Any] = {}
    budget = _Budget(MAX_NODES)

    def visit(value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CheckpointFormatError(f"object tree nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, NumpyArray):
            return value.resolve()
        if isinstance(value, NumpyDtype):
            return str(value.resolve())
        if not isinstance(value, (dict, list, tuple, set, frozenset, PickledObject)):
            return value
        key = id(value)
        if key in done:
            return done[key]
        budget.spend()
        done[key] = value
        if isinstance(value, dict):
            for k in list(value):
                value[k] = visit(value[k], depth + 1)
        elif isinstance(value, list):
            value[:] = [visit(v, depth + 1) for v in value]
        elif isinstance(value, tuple):
            new = tuple(visit(v, depth + 1) for v in value)
            if any(a is not b for a, b in zip(new, value, strict=True)):
                done[key] = new
            return done[key]
        elif isinstance(value, PickledObject):
            d = value.__dict__
            d["args"] = tuple(visit(v, depth + 1) for v in d["args"])
            d["kwargs"] = {k: visit(v, depth + 1) for k, v in d["kwargs"].items()}
            d["state"] = visit(d["state"], depth + 1)
            d["items"] = [visit(v, depth + 1) for v in d["items"]]
            d["entries"] = [(visit(k, depth + 1), visit(v, depth + 1)) for k, v in d["entries"]]
        return value

    return visit(obj, 0)


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, TensorRef]]:
    """Every tensor in ``obj`` with a dotted key path (``optimizer_state_dict.x.0``).

    A tensor reachable along several paths is yielded once, under the first path.

    Raises:
        CheckpointFormatError: the tree nests too deeply or its key paths are too long.
    """
    seen: set[int] = set()
    budget = _Budget(MAX_NODES)
    path_chars = _Budget(MAX_PATHS_TOTAL, "tensor key paths too long in total")
    # Paths stay (parent entry, key) links until a tensor needs its path spelled out: a long
    # key above many containers is then not copied into each of them.
    stack: list[_Entry] = [(None, prefix, obj, 0)]
    while stack:
        entry = stack.pop()
        _, _, value, depth = entry
        if depth > MAX_DEPTH:
            raise CheckpointFormatError(f"object tree nests deeper than {MAX_DEPTH} levels")
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, TensorRef):
            path = _spell(entry)
            path_chars.spend(len(path))
            yield path, value
            continue
        budget.spend()
        for key, child in reversed(_children(value) or []):
            if isinstance(child, _WALKED) and id(child) not in seen:
                stack.append((entry, key, child, depth + 1))


_Entry = tuple[Any, Any, Any, int]
_WALKED = (dict, list, tuple, PickledObject, TensorRef)


def _spell(entry: _Entry) -> str:
    keys: list[str] = []
    length = 0
    node: _Entry | None = entry
    while node is not None:
        keys.append(_key(node[1]))
        length += len(keys[-1]) + 1
        if length > MAX_PATH + 1:
            raise CheckpointFormatError(f"a tensor's key path is longer than {MAX_PATH} characters")
        node = node[0]
    path = ""
    for key in reversed(keys):
        path = f"{path}.{key}" if path else key
    return path


def _children(value: Any) -> list[tuple[Any, Any]] | None:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    if isinstance(value, PickledObject):
        d = value.__dict__
        out: list[tuple[Any, Any]] = [(f"args.{i}", v) for i, v in enumerate(d["args"])]
        if isinstance(d["state"], dict):
            out += [(f"state.{_key(k)}", v) for k, v in d["state"].items()]
        elif d["state"] is not None:
            out.append(("state", d["state"]))
        out += [(f"items.{i}", v) for i, v in enumerate(d["items"])]
        out += [(f"entries.{_key(k)}", v) for k, v in d["entries"]]
        return out
    return None


def to_json(obj: Any, tensor: Callable[[TensorRef], Any] | None = None) -> Any:
    """A JSON-ready rendering of ``obj``.

    Plain containers become dicts and lists; tuples and sets lists; bytes
    ``{"__bytes__": base64}``; non-finite floats strings; numpy arrays
    ``{"__ndarray__": dtype, "shape", "data"}``; inert objects
    ``{"__class__": "module.name", "args", "state", ...}``; tensors whatever ``tensor``
    returns (default: a description).
    """
    budget = _Budget(MAX_NODES)
    repeated = _Budget(MAX_REPEATED)
    active: set[int] = set()
    rendered: set[int] = set()

    def describe(ref: TensorRef) -> Any:
        return {"__tensor__": str(ref.dtype).removeprefix("torch."), "shape": list(ref.shape)}

    render_tensor = tensor or describe

    def visit(value: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CheckpointFormatError(f"object tree nests deeper than {MAX_DEPTH} levels")
        budget.spend()
        if type(value) is TensorRef:  # first: a ZeRO file of many comm intervals is mostly these
            return render_tensor(value)
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            # Python refuses to print integers over 4300 digits in decimal; hex has no limit.
            return {"__int__": hex(value)}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, TensorRef):
            return render_tensor(value)
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, complex):
            return {"__complex__": [visit(value.real, depth), visit(value.imag, depth)]}
        if isinstance(value, DType):
            return str(value)
        if isinstance(value, np.ndarray):
            return {
                "__ndarray__": str(value.dtype),
                "shape": list(value.shape),
                "data": [visit(v, depth + 1) for v in value.reshape(-1).tolist()],
            }
        if isinstance(value, np.generic):
            return visit(value.item(), depth)
        if type(value) is RecordRun:
            return visit(value.records(), depth)
        if id(value) in active:
            raise CheckpointFormatError("object tree contains a cycle")
        if id(value) in rendered:
            # Shared references expand into copies; a few small ones are normal, a chain
            # of lists each holding the previous one twice is exponential.
            shared = isinstance(value, (dict, list, tuple, set, frozenset))
            repeated.spend(len(value) if shared else 1)
        rendered.add(id(value))
        active.add(id(value))
        try:
            if isinstance(value, dict):
                return {_key(k): child(v, depth + 1) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [child(v, depth + 1) for v in value]
            if isinstance(value, (set, frozenset)):
                return sorted((visit(v, depth + 1) for v in value), key=repr)
            if isinstance(value, PickledObject):
                d = value.__dict__
                out: dict[str, Any] = {"__class__": value.qualname}
                if d["args"]:
                    out["args"] = [visit(v, depth + 1) for v in d["args"]]
                if d["kwargs"]:
                    out["kwargs"] = visit(d["kwargs"], depth + 1)
                if d["state"] is not None:
                    out["state"] = visit(d["state"], depth + 1)
                if d["items"]:
                    out["items"] = visit(d["items"], depth + 1)
                if d["entries"]:
                    out["entries"] = [[visit(k, depth + 1), visit(v, depth + 1)]
                                      for k, v in d["entries"]]
                return out
        finally:
            active.discard(id(value))
        return {"__unknown__": type(value).__name__}

    def child(value: Any, depth: int) -> Any:
        # Tensors and strings without a call of visit: a ZeRO file of many comm intervals
        # holds hundreds of thousands of them in its lists and dicts.
        kind = type(value)
        if kind is TensorRef or kind is str:
            budget.spend()
            return value if kind is str else render_tensor(value)
        return visit(value, depth)

    return visit(obj, 0)


def _key(key: Any) -> str:
    """A dict key or list index as text (paths, JSON object keys)."""
    if isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() > 64:
        return hex(key)
    try:
        return str(key)
    except ValueError as exc:  # a key holding an integer over 4300 digits
        raise CheckpointFormatError(f"a key cannot be written as text: {exc}") from exc
