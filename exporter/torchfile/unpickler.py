"""A pickle reader that never imports a module or calls anything a pickle names.

Why not ``torch.load(weights_only=True)``: it refuses DeepSpeed's optimizer files outright
(loss scaler objects, ``ZeroStageEnum``), and allowing those globals there means importing
and running DeepSpeed's classes. Why not plain ``pickle``: executing a downloaded pickle is
remote code execution. Here every global the pickle names is resolved by :meth:`find_class`
against a fixed table of *our own* pure functions (containers, tensor records, numpy values);
anything else becomes an inert :class:`~exporter.torchfile.records.PickledObject`.

The opcode stream is first walked by :func:`exporter.torchfile.prescan.prescan`, which executes
nothing and bounds what the C unpickler would do unchecked (memo size, nesting, hashing work).
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exporter.dtypes import BY_NAME, STORAGE_TYPES, DType
from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile.numpy_records import NumpyArray, NumpyDtype
from exporter.torchfile.prescan import prescan
from exporter.torchfile.records import (
    MAX_INT64,
    PickledObject,
    StorageRef,
    TensorRef,
    pickled_class,
    short_repr,
)

if TYPE_CHECKING:
    from exporter.torchfile.container import TorchZip
    from exporter.torchfile.opbounds import Opcodes


#: Bytes of the pickle the unpickler reads ahead at a time.
READ_AHEAD = 1 << 20

# Globals that have a known meaning but no plain-value form: kept as inert records, not flagged.
INERT_KNOWN = frozenset(
    {
        "argparse.Namespace",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "torch.nn.parameter.Parameter",
    }
)


#: ``torch.<name>`` dtypes (aliases included) and ``torch.<X>Storage`` classes: their types.
DTYPES: dict[str, DType] = BY_NAME


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.<X>Storage``: only its dtype matters."""

    name: str
    dtype: DType
    itemsize: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "itemsize", self.dtype.itemsize)

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError("a pickle tried to modify a storage type")


@dataclass
class UnpickleResult:
    """What one ``data.pkl`` held.

    Attributes:
        obj: the root value, tensors as :class:`TensorRef`, unknown objects inert.
        globals: every global the pickle named, in first-seen order, with whether it is known.
        opcodes: the pickle's opcodes, where the prescan's fast path parsed them.
        memo: the unpickler's memo at the end, when asked for (``keep``).
    """

    obj: Any
    globals: dict[str, bool] = field(default_factory=dict)
    opcodes: Opcodes | None = None
    memo: dict[int, Any] | None = None


def _torch_size(*args: Any) -> tuple[int, ...]:
    if len(args) != 1 or not isinstance(args[0], (tuple, list)):
        raise UnsafePickleError("torch.Size with unexpected arguments")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in args[0]):
        raise UnsafePickleError("torch.Size with non-integer sizes")
    return tuple(args[0])


def _torch_device(*args: Any) -> str:
    if not args or not isinstance(args[0], str) or len(args) > 2:
        raise UnsafePickleError("torch.device with unexpected arguments")
    if len(args) == 2 and args[1] is not None:
        return f"{args[0]}:{int(args[1])}"
    return args[0]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    return TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_: Any) -> Any:
    # torch/_utils.py _rebuild_parameter(data, requires_grad, backward_hooks[, state])
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch/_tensor.py _rebuild_from_type_v2: func(*args), then re-typed; we keep func's value.
    if not isinstance(func, SafeGlobal) or func.func not in (
        TensorRef, _rebuild_tensor, _rebuild_parameter
    ):
        raise UnsafePickleError("tensor subclass rebuilt through an unknown function")
    if not isinstance(args, tuple):
        raise UnsafePickleError("malformed tensor subclass arguments")
    return func(*args)


def _ordered_dict(*args: Any) -> OrderedDict:
    if not args:  # torch pickles one per tensor (its backward hooks)
        return OrderedDict()
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise UnsafePickleError("OrderedDict with unexpected arguments")
    return OrderedDict(*args)


def _container(kind: type) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset))):
            raise UnsafePickleError(f"{kind.__name__} with unexpected arguments")
        return kind(*args)

    return build


def _complex(*args: Any) -> complex:
    if len(args) > 2 or not all(isinstance(a, (int, float)) for a in args):
        raise UnsafePickleError("complex with unexpected arguments")
    return complex(*args)


def _codecs_encode(text: Any, encoding: Any = "utf-8", *_: Any) -> bytes:
    # numpy pickles with protocol 2 pass bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode with unexpected arguments")
    return text.encode("latin-1")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    # numpy/core/multiarray.py scalar(dtype, obj): a 0-d value from raw bytes.
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, (bytes, str)):
        raise UnsafePickleError("numpy scalar with unexpected arguments")
    raw = data.encode("latin-1") if isinstance(data, str) else data
    resolved = dtype.resolve()
    if len(raw) != resolved.itemsize:
        raise CheckpointFormatError("numpy scalar with the wrong number of bytes")
    import numpy as np

    return np.frombuffer(raw, dtype=resolved)[0].item()


def _copyreg_reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # copyreg._reconstructor (protocols 0 and 1): only stand-in classes are instantiated.
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise UnsafePickleError("copyreg._reconstructor on a class the reader does not know")
    return cls.__new__(cls, state) if state is not None else cls.__new__(cls)


class SafeGlobal(functools.partial):
    """What :meth:`_SafeUnpickler.find_class` returns for a known global: a call-only handle.

    The functions and classes behind these handles are shared by every load in the process.
    Handed out bare, a pickle could BUILD on them (``setattr(func, '__defaults__', ...)``)
    and change how later files are read, or NEWOBJ a class without running its checks; a
    handle can only be called. A ``functools.partial`` without bound arguments, because
    its call is made in C: the unpickler calls a handle once per tensor and more.
    """

    __slots__ = ("name",)

    def __new__(cls, name: str, func: Callable[..., Any]) -> SafeGlobal:
        handle = super().__new__(cls, func)
        handle.name = name
        return handle

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError(f"a pickle tried to modify the reader's {self.name}")

    def __repr__(self) -> str:
        return f"<reader function {self.name}>"


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

_SAFE_FUNCTIONS: dict[str, Any] = {
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _container(set),
    "builtins.frozenset": _container(frozenset),
    "builtins.bytearray": _container(bytearray),
    "builtins.complex": _complex,
    "_codecs.encode": _codecs_encode,
    "copyreg._reconstructor": _copyreg_reconstructor,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    # torch/_utils.py _rebuild_tensor_v2: the record checks its own arguments.
    "torch._utils._rebuild_tensor_v2": TensorRef,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "numpy.dtype": NumpyDtype,
    "numpy.ndarray": NumpyArray,
    **{f"{m}._reconstruct": NumpyArray for m in _NUMPY_MODULES},
    **{f"{m}.scalar": _numpy_scalar for m in _NUMPY_MODULES},
}
SAFE_FUNCTIONS: dict[str, SafeGlobal] = {
    name: SafeGlobal(name, func) for name, func in _SAFE_FUNCTIONS.items()
}
#: The globals that make numpy records (:func:`exporter.torchfile.tree.resolve_numpy`).
NUMPY_RECORD_GLOBALS = frozenset(
    name for name, func in _SAFE_FUNCTIONS.items() if func in (NumpyDtype, NumpyArray)
)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zip_: TorchZip | None, spans: bool = True) -> None:
        # Through a buffered reader: the C unpickler then takes its bytes a megabyte at a time
        # from ``peek`` instead of calling ``read`` for every opcode and argument (0.15 s
        # against 0.09 s for a partition file of 36,000 tensors and a million opcodes).
        super().__init__(io.BufferedReader(io.BytesIO(data), READ_AHEAD))
        self._zip = zip_
        self.globals: dict[str, bool] = {}
        self._classes: dict[str, type[PickledObject]] = {}
        self._storages: dict[str, StorageRef] = {}
        # Every storage's member, looked up at once (not for a run of a few records).
        self._spans = zip_.storage_spans() if zip_ is not None and spans else None
        self._path = zip_.path if zip_ is not None else None

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafePickleError("a global with a non-string name")
        # Protocol 0-2 pickles name Python 2 modules (``__builtin__.set``); map them as
        # pickle.Unpickler.find_class does with fix_imports (Lib/_compat_pickle.py tables).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        if len(qualname) > 512:
            raise UnsafePickleError("a global with an overlong name")
        value: Any
        if qualname in SAFE_FUNCTIONS:
            value = SAFE_FUNCTIONS[qualname]
        elif module == "torch" and name in STORAGE_TYPES:
            value = StorageType(name, STORAGE_TYPES[name])
        elif module == "torch" and name in DTYPES:
            value = DTYPES[name]
        else:
            if qualname not in self._classes:
                self._classes[qualname] = pickled_class(module, name)
            value = self._classes[qualname]
            self.globals.setdefault(qualname, qualname in INERT_KNOWN)
            return value
        self.globals.setdefault(qualname, True)
        return value

    def persistent_load(self, pid: Any) -> Any:
        # torch/serialization.py _load.persistent_load:
        # ('storage', storage_type, key, location, numel)
        # Once per storage (tens of thousands in a ZeRO file of many comm intervals): first
        # the case torch.save writes, a new storage of a member that holds its bytes, in
        # plain comparisons; anything else takes the checks below, which name the fault.
        if type(pid) is tuple and len(pid) == 5:
            tag, storage_type, key, location, numel = pid
            if (tag == "storage" and type(storage_type) is StorageType and type(key) is str
                    and type(location) is str and type(numel) is int
                    and key not in self._storages and 0 <= numel <= MAX_INT64):
                span = self._spans.get(key) if self._spans is not None else None
                if span is not None and span[1] == numel * storage_type.itemsize:
                    ref = self._storages[key] = StorageRef.at(
                        self._path, key, storage_type.dtype, numel, location, span[0])
                    return ref
        return self._persistent_load(pid)

    def _persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unsupported persistent id {short_repr(pid)}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise UnsafePickleError(f"storage of unknown type {short_repr(storage_type)}")
        if self._zip is None:
            raise CheckpointFormatError("persistent storage reference outside a torch zip file")
        if not isinstance(key, str):
            raise CheckpointFormatError(f"invalid storage key {short_repr(key)}")
        if key not in self._storages:
            self._storages[key] = StorageRef(
                self._zip, key, storage_type.dtype, numel,
                location if isinstance(location, str) else short_repr(location, 64),
            )
        elif (self._storages[key].dtype, self._storages[key].numel) != (storage_type.dtype, numel):
            # torch.save writes one persistent id per storage (torch/serialization.py _save
            # persistent_id), so a second reference can only repeat the first.
            raise CheckpointFormatError(
                f"storage {short_repr(key)} referenced with two different dtypes or sizes"
            )
        return self._storages[key]


def safe_unpickle(data: bytes, zip_: TorchZip | None = None, keep: bool = False) -> UnpickleResult:
    """Unpickle ``data`` into plain values and inert records, executing nothing it names.

    Args:
        data: the pickle bytes (a torch file's ``data.pkl``).
        zip_: the container that holds the storages referenced by persistent ids.
        keep: also return the opcodes and the memo (:mod:`exporter.torchfile.patched`).

    Raises:
        UnsafePickleError, CheckpointFormatError: the pickle is refused or malformed.
    """
    opcodes = prescan(data)
    unpickler = _SafeUnpickler(data, zip_)
    try:
        obj = unpickler.load()
    except (UnsafePickleError, CheckpointFormatError):
        raise
    except RecursionError as exc:
        raise UnsafePickleError("pickle nests too deeply") from exc
    except MemoryError as exc:
        raise UnsafePickleError("pickle needs too much memory") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile pickle is a format error
        raise CheckpointFormatError(f"malformed pickle: {type(exc).__name__}: {exc}"[:300]) from exc
    if not keep:
        return UnpickleResult(obj, unpickler.globals)
    return UnpickleResult(obj, unpickler.globals, opcodes, unpickler.memo.copy())


def replay(data: bytes, zip_: TorchZip) -> Any:
    """The value of a run of a pickle read before, as a pickle of its own
    (:mod:`exporter.torchfile.patched`); None if it fails."""
    unpickler = _SafeUnpickler(data, zip_, spans=False)
    try:
        return unpickler.load()
    except Exception:  # noqa: BLE001 - the file is then read in full, which names the fault
        return None
