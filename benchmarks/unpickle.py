"""Where reading one partition file's pickle goes: the reader against the C unpickler alone.

    python benchmarks/unpickle.py FILE.pt [--repeats 5]

``FILE.pt`` is a ``torch.save`` file, typically a ZeRO partition file of many comm intervals
(``python benchmarks/run.py`` leaves one under its work folder). Best of ``--repeats``, the
garbage collector paused as the reader pauses it, seconds for:

- ``prescan``: the reader's check of the opcodes (``exporter.torchfile.prescan``);
- ``reader``: ``safe_unpickle`` after the prescan (the persistent-id and tensor-record
  callbacks with their checks, the restricted ``find_class``);
- ``C unpickler, trivial callbacks``: :class:`pickle.Unpickler` with a ``persistent_load``
  and a tensor rebuild that only return their arguments, and inert classes: what reading the
  pickle costs before any check or record;
- ``C unpickler, no Python callbacks``: the same with C callables in their place (a
  ``functools.partial`` for the tensor rebuild and for ``persistent_load``): what the
  callbacks' Python calls cost, as the difference from the row above;
- ``load_torch_file``: the whole read (zip directory and local headers included).

This is a measurement tool: the trivial unpickler executes nothing either (every global
becomes an empty class or returns its arguments), but it checks nothing and is no reader.
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

from measure import best_of

from exporter.torchfile import load_torch_file
from exporter.torchfile.container import MAX_PICKLE_BYTES, TorchZip
from exporter.torchfile.prescan import prescan
from exporter.torchfile.unpickler import safe_unpickle


def _arguments(*args: Any) -> tuple[Any, ...]:
    return args


class _Trivial(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "OrderedDict":
            return OrderedDict
        if name.startswith("_rebuild"):
            return _arguments
        return type(name, (), {"__init__": lambda self, *a: None,
                               "__setstate__": lambda self, state: None})

    def persistent_load(self, pid: Any) -> Any:
        return pid


class _CLevel(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        # Set on the instance: the C unpickler then calls it without a Python frame.
        self.persistent_load = functools.partial(functools.partial, _arguments)

    def find_class(self, module: str, name: str) -> Any:
        if name.startswith("_rebuild"):
            return functools.partial
        return _Trivial.find_class(self, module, name)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    zip_ = TorchZip(args.file)
    data = zip_.read_member("data.pkl", MAX_PICKLE_BYTES)

    def reader() -> None:
        with zip_.open():
            safe_unpickle(data, zip_)

    gc.disable()
    try:
        rows = {
            "prescan": best_of(lambda: prescan(data), args.repeats),
            "prescan + reader": best_of(reader, args.repeats),
            "C unpickler, trivial callbacks": best_of(
                lambda: _Trivial(io.BytesIO(data)).load(), args.repeats),
            "C unpickler, no Python callbacks": best_of(
                lambda: _CLevel(data).load(), args.repeats),
            "load_torch_file": best_of(lambda: load_torch_file(args.file), args.repeats),
        }
    finally:
        gc.enable()
    print(f"{args.file.name}: {len(data):,} bytes of pickle, best of {args.repeats}")
    for name, seconds in rows.items():
        print(f"  {name:32s} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
