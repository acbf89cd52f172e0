"""A pickle reader that never imports a module or calls anything a pickle names.

Why not ``torch.load(weights_only=True)``: it refuses DeepSpeed's optimizer files outright
(loss scaler objects, ``ZeroStageEnum``), and allowing those globals there means importing
and running DeepSpeed's classes. Why not plain ``pickle``: executing a downloaded pickle is
remote code execution. Here every global the pickle names is resolved by :meth:`find_class`
against a fixed table of *our own* pure functions (containers, tensor records, numpy values);
anything else becomes an inert :class:`~exporter.torchfile.records.PickledObject`.

The opcode stream is first walked with :func:`pickletools.genops` (a parser, it executes
nothing) to bound memo indices and nesting before the C unpickler runs: the C unpickler sizes
its memo table from the largest index it sees, so ``LONG_BINPUT 2**31`` alone could exhaust
memory. The walk also follows the stack to bound hashing work: a tuple holding the same tuple
twice, nested sixty times, is a few hundred bytes of pickle but 2**60 steps to hash, and the
C unpickler hashes every dict key and set item it builds.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from exporter.errors import CheckpointFormatError, UnsafePickleError
from exporter.torchfile.records import (
    NumpyArray,
    NumpyDtype,
    PickledObject,
    StorageRef,
    TensorRef,
    pickled_class,
    short_repr,
)

if TYPE_CHECKING:
    from exporter.torchfile.container import TorchZip

MAX_OPCODES = 20_000_000
MAX_DEPTH = 1_000
#: Elements hashed while building dict keys, set items and call arguments (tuples count
#: every element they reach through nested tuples, shared or not).
MAX_HASH_WORK = 10_000_000

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


def _dtype_table() -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
    dtypes = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    storages = {
        storage_name: dtype for dtype, storage_name in _storage_names().items() if dtype in dtypes.values()
    }
    storages["UntypedStorage"] = torch.uint8
    return dtypes, storages


def _storage_names() -> dict[torch.dtype, str]:
    # torch/storage.py `_dtype_to_storage_type_map`: the names torch.save pickles.
    return {
        torch.float64: "DoubleStorage",
        torch.float32: "FloatStorage",
        torch.float16: "HalfStorage",
        torch.bfloat16: "BFloat16Storage",
        torch.int64: "LongStorage",
        torch.int32: "IntStorage",
        torch.int16: "ShortStorage",
        torch.int8: "CharStorage",
        torch.uint8: "ByteStorage",
        torch.bool: "BoolStorage",
        torch.complex64: "ComplexFloatStorage",
        torch.complex128: "ComplexDoubleStorage",
        torch.quint8: "QUInt8Storage",
        torch.qint8: "QInt8Storage",
        torch.qint32: "QInt32Storage",
    }


DTYPES, STORAGE_TYPES = _dtype_table()


@dataclass(frozen=True, slots=True)
class StorageType:
    """Stand-in for ``torch.<X>Storage``: only its dtype matters."""

    name: str
    dtype: torch.dtype

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError("a pickle tried to modify a storage type")


@dataclass
class UnpickleResult:
    """What one ``data.pkl`` held.

    Attributes:
        obj: the root value, tensors as :class:`TensorRef`, unknown objects inert.
        globals: every global the pickle named, in first-seen order, with whether it is known.
    """

    obj: Any
    globals: dict[str, bool] = field(default_factory=dict)


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


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any
) -> TensorRef:
    # torch/_utils.py _rebuild_tensor_v2(storage, storage_offset, size, stride,
    # requires_grad, backward_hooks, metadata=None); hooks and metadata are dropped.
    if not isinstance(storage, StorageRef):
        raise CheckpointFormatError("tensor rebuilt from something that is not a storage")
    return TensorRef(storage, offset, size, stride, requires_grad)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_: Any) -> Any:
    # torch/_utils.py _rebuild_parameter(data, requires_grad, backward_hooks[, state])
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # torch/_tensor.py _rebuild_from_type_v2: func(*args), then re-typed; we keep func's value.
    if not isinstance(func, SafeGlobal) or func.func not in (
        _rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter
    ):
        raise UnsafePickleError("tensor subclass rebuilt through an unknown function")
    if not isinstance(args, tuple):
        raise UnsafePickleError("malformed tensor subclass arguments")
    return func(*args)


def _ordered_dict(*args: Any) -> OrderedDict:
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


class SafeGlobal:
    """What :meth:`_SafeUnpickler.find_class` returns for a known global: a call-only handle.

    The functions and classes behind these handles are shared by every load in the process.
    Handed out bare, a pickle could BUILD on them (``setattr(func, '__defaults__', ...)``)
    and change how later files are read, or NEWOBJ a class without running its checks; a
    handle can only be called.
    """

    __slots__ = ("name", "func")

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        self.name = name
        self.func = func

    def __call__(self, *args: Any) -> Any:
        return self.func(*args)

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
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
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


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zip_: TorchZip | None) -> None:
        super().__init__(io.BytesIO(data))
        self._zip = zip_
        self.globals: dict[str, bool] = {}
        self._classes: dict[str, type[PickledObject]] = {}
        self._storages: dict[str, StorageRef] = {}

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


class _Value:
    """What the prescan knows of one stack value: how much hashing it costs.

    ``weight``: the elements ``hash()`` visits (a tuple descends into the tuples it holds;
    anything else hashes in one step or fails at once). ``elems``: what hashing each element
    of this list, tuple or dict (its keys) costs, as ``set(x)`` or ``OrderedDict(x)`` would.
    """

    __slots__ = ("weight", "elems", "children")

    def __init__(self, weight: int = 1, elems: int = 0, children: list[_Value] | None = None):
        self.weight = weight
        self.elems = elems
        self.children = children


_MARK = _Value()
_LEAF = _Value()  # any value that is neither a container nor a call result; never mutated
_CAP = MAX_HASH_WORK + 1

# Opcode kinds for the prescan (stack effects as listed in Lib/pickletools.py).
(_PUSH_LEAF, _NOTHING, _NEW_CONTAINER, _PUT, _GET, _MEMOIZE, _MARK_OP, _POP, _POP_MARK, _DUP,
 _TUPLE_N, _TUPLE_MARK, _APPEND, _SETITEM, _APPENDS, _SETITEMS, _ADDITEMS, _LIST, _DICT,
 _FROZENSET, _CALL2, _NEWOBJ_EX, _BUILD, _CALL_MARK, _POP1_PUSH, _POP2_PUSH, _STOP) = range(27)
_KINDS: dict[str, int] = {
    "PROTO": _NOTHING, "FRAME": _NOTHING, "STOP": _STOP,
    "EMPTY_LIST": _NEW_CONTAINER, "EMPTY_DICT": _NEW_CONTAINER, "EMPTY_SET": _NEW_CONTAINER,
    "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE,
    "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
    "MARK": _MARK_OP, "POP": _POP, "POP_MARK": _POP_MARK, "DUP": _DUP,
    "EMPTY_TUPLE": _TUPLE_N, "TUPLE1": _TUPLE_N, "TUPLE2": _TUPLE_N, "TUPLE3": _TUPLE_N,
    "TUPLE": _TUPLE_MARK, "APPEND": _APPEND, "SETITEM": _SETITEM, "APPENDS": _APPENDS,
    "SETITEMS": _SETITEMS, "ADDITEMS": _ADDITEMS, "LIST": _LIST, "DICT": _DICT,
    "FROZENSET": _FROZENSET, "REDUCE": _CALL2, "NEWOBJ": _CALL2, "NEWOBJ_EX": _NEWOBJ_EX,
    "BUILD": _BUILD, "INST": _CALL_MARK, "OBJ": _CALL_MARK,
    "READONLY_BUFFER": _POP1_PUSH, "BINPERSID": _POP1_PUSH, "STACK_GLOBAL": _POP2_PUSH,
}
_TUPLE_SIZES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class _Prescan:
    """Follows a pickle's stack symbolically: each value is a :class:`_Value`, never an object."""

    def __init__(self) -> None:
        self.stack: list[_Value] = []
        self.memo: dict[int, _Value] = {}
        self.work = 0
        self.depth = 0

    def spend(self, amount: int) -> None:
        self.work += amount
        if self.work > MAX_HASH_WORK:
            raise UnsafePickleError(
                f"pickle needs more than {MAX_HASH_WORK} hashing steps (shared references)"
            )

    def pop(self, count: int) -> list[_Value]:
        start = len(self.stack) - count
        if start < 0 or any(v is _MARK for v in self.stack[start:]):
            raise CheckpointFormatError("malformed pickle: stack underflow")
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def pop_mark(self) -> list[_Value]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                self.depth -= 1
                return items
        raise CheckpointFormatError("malformed pickle: MARK missing")

    def top(self) -> _Value:
        if not self.stack or self.stack[-1] is _MARK:
            raise CheckpointFormatError("malformed pickle: stack underflow")
        return self.stack[-1]

    def add(self, target: _Value, items: list[_Value], stride: int, hashed: bool) -> None:
        """``items`` (or key, value pairs) go into the list, dict or set ``target``."""
        cost = sum(v.weight for v in items[::stride])
        if hashed:
            self.spend(cost)
        if target is not _LEAF and target.children is None:
            target.elems = min(target.elems + cost, _CAP)

    def call(self, args: list[_Value]) -> None:
        # A call may hash what its arguments hold (set(list), OrderedDict(pairs)); BUILD
        # re-inserts the keys of a state dict.
        self.spend(sum(a.elems + sum(c.elems for c in a.children or ()) for a in args))

    def step(self, kind: int, name: str, arg: Any) -> None:
        """The stack effect of one opcode (PROTO, FRAME and leaf pushes are done by the caller)."""
        stack = self.stack
        if kind == _GET:
            value = self.memo.get(int(arg))
            if value is None:
                raise CheckpointFormatError(f"pickle reads memo slot {arg} that was never set")
            stack.append(value)
        elif kind == _MEMOIZE:
            self.memo[len(self.memo)] = self.top()
        elif kind == _NEW_CONTAINER:
            stack.append(_Value())
        elif kind == _MARK_OP:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise UnsafePickleError(f"pickle nests deeper than {MAX_DEPTH} levels")
            stack.append(_MARK)
        elif kind in (_TUPLE_N, _TUPLE_MARK):
            items = self.pop_mark() if kind == _TUPLE_MARK else self.pop(_TUPLE_SIZES[name])
            weight = min(1 + sum(i.weight for i in items), _CAP)
            stack.append(_Value(weight, weight - 1, items))
        elif kind in (_APPEND, _SETITEM):
            items = self.pop(1 if kind == _APPEND else 2)
            self.add(self.top(), items, len(items), kind == _SETITEM)
        elif kind in (_APPENDS, _SETITEMS, _ADDITEMS):
            items = self.pop_mark()
            self.add(self.top(), items, 2 if kind == _SETITEMS else 1, kind != _APPENDS)
        elif kind in (_LIST, _DICT, _FROZENSET):
            container = _Value()
            self.add(container, self.pop_mark(), 2 if kind == _DICT else 1, kind != _LIST)
            stack.append(container)
        elif kind == _BUILD:
            self.call(self.pop(1))
            self.top()
        elif kind in (_CALL2, _NEWOBJ_EX):
            self.call(self.pop(3 if kind == _NEWOBJ_EX else 2)[1:])
            stack.append(_Value())
        elif kind == _CALL_MARK:
            self.call(self.pop_mark())
            stack.append(_Value())
        elif kind == _POP:
            if stack and stack[-1] is _MARK:
                self.pop_mark()  # POP drops a MARK as well (Lib/pickle.py load_pop)
            else:
                self.pop(1)
        elif kind == _POP_MARK:
            self.pop_mark()
        elif kind == _DUP:
            stack.append(self.top())
        elif kind in (_POP1_PUSH, _POP2_PUSH):
            self.pop(1 if kind == _POP1_PUSH else 2)
            stack.append(_LEAF)


def prescan(data: bytes) -> None:
    """Walk the opcode stream without executing it; refuse what could exhaust memory or time."""
    scan = _Prescan()
    kinds = _KINDS
    stack = scan.stack
    try:
        for ops, (opcode, arg, _) in enumerate(pickletools.genops(data), 1):
            if ops > MAX_OPCODES:
                raise UnsafePickleError(f"pickle has more than {MAX_OPCODES} opcodes")
            kind = kinds.get(opcode.name, _PUSH_LEAF)
            if kind == _PUSH_LEAF:  # the most frequent kinds first, inline
                stack.append(_LEAF)
            elif kind == _PUT:
                if not 0 <= arg <= ops:
                    raise UnsafePickleError(f"pickle memo index {arg} out of range")
                scan.memo[arg] = scan.top()
            elif kind == _STOP:
                return
            else:
                scan.step(kind, opcode.name, arg)
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"malformed pickle: {exc}") from exc
    raise CheckpointFormatError("malformed pickle: no STOP opcode")


def safe_unpickle(data: bytes, zip_: TorchZip | None = None) -> UnpickleResult:
    """Unpickle ``data`` into plain values and inert records, executing nothing it names.

    Args:
        data: the pickle bytes (a torch file's ``data.pkl``).
        zip_: the container that holds the storages referenced by persistent ids.

    Raises:
        UnsafePickleError, CheckpointFormatError: the pickle is refused or malformed.
    """
    prescan(data)
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
    return UnpickleResult(obj, unpickler.globals)
