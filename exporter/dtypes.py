"""Element types of checkpoint tensors, without importing torch.

Reading a checkpoint and writing its safetensors needs only each tensor's element type: its
name (``float32``), size, safetensors code (``F32``) and the numpy type its bytes can be
viewed as. torch is the one library that knows every type a ``.pt`` file can name, but
``import torch`` costs about a second of one core and 190 MB of memory per process (measured
in ``benchmarks/RESULTS.md``, "Tenth round"), more than planning a Pythia checkpoint; an
export imports it only when a tensor is cast or a GPU computes. So the export's types are the
:class:`DType` values here, one per torch dtype (``torch/_C/_VariableFunctions`` names them;
:func:`as_dtype` takes a ``torch.dtype`` too), and its chunks are numpy arrays of
:attr:`DType.numpy`: numpy's own type where it has one, the unsigned integer of the same size
(the bit patterns) for ``bfloat16`` and the float8 types, which numpy lacks.

A :class:`DType` compares equal to the ``torch.dtype`` of the same name, so code written
against torch's types reads the same; :meth:`DType.torch` gives that ``torch.dtype``
(importing torch then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.errors import UnsafePickleError


@dataclass(frozen=True, eq=False, slots=True)
class DType:
    """One element type.

    Attributes:
        name: torch's name without the module (``float32``).
        itemsize: bytes per element.
        code: the safetensors dtype code (``F32``), or None where safetensors has none.
        numpy: the numpy type a chunk of this type is held in (the bit patterns' unsigned
            integer for bfloat16 and float8).
        is_floating_point, is_complex: as torch says of the type.
    """

    name: str
    itemsize: int
    code: str | None
    numpy: np.dtype[Any]
    is_floating_point: bool = False
    is_complex: bool = False

    def __str__(self) -> str:
        return f"torch.{self.name}"

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return other is self
        if _is_torch_dtype(other):
            return str(other) == f"torch.{self.name}"
        return NotImplemented

    # One value a type (:data:`BY_NAME`; unpickled through :func:`as_dtype`), so identity is
    # equality: hashed by the interpreter's own pointer hash, not a Python call (sets and
    # dicts of the types of a ZeRO file's 290,000 partitions hash one per partition).
    __hash__ = object.__hash__

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return as_dtype, (self.name,)

    def __setstate__(self, state: object) -> None:
        # The safe unpickler hands these shared values to pickles that name ``torch.float32``;
        # a BUILD on one must not change how every later file is read.
        raise UnsafePickleError("a pickle tried to modify a dtype")

    @property
    def is_bits(self) -> bool:
        """Whether numpy holds this type's bit patterns, not its values (bfloat16, float8)."""
        return self.is_floating_point and self.numpy.kind != "f"

    @property
    def torch(self) -> Any:
        """The ``torch.dtype`` of this name (imports torch)."""
        import torch

        return getattr(torch, self.name)


def _is_torch_dtype(value: object) -> bool:
    kind = type(value)
    return kind.__name__ == "dtype" and kind.__module__ == "torch"


def _make(name: str, itemsize: int, code: str | None, numpy: str, floating: bool = False,
          complex_: bool = False) -> DType:
    return DType(name, itemsize, code, np.dtype(numpy), floating, complex_)


_ALL = [
    _make("float64", 8, "F64", "<f8", floating=True),
    _make("float32", 4, "F32", "<f4", floating=True),
    _make("float16", 2, "F16", "<f2", floating=True),
    _make("bfloat16", 2, "BF16", "<u2", floating=True),
    _make("float8_e4m3fn", 1, "F8_E4M3", "u1", floating=True),
    _make("float8_e5m2", 1, "F8_E5M2", "u1", floating=True),
    _make("float8_e4m3fnuz", 1, None, "u1", floating=True),
    _make("float8_e5m2fnuz", 1, None, "u1", floating=True),
    _make("float8_e8m0fnu", 1, None, "u1", floating=True),
    _make("float4_e2m1fn_x2", 1, None, "u1", floating=True),
    _make("int64", 8, "I64", "<i8"),
    _make("int32", 4, "I32", "<i4"),
    _make("int16", 2, "I16", "<i2"),
    _make("int8", 1, "I8", "i1"),
    _make("uint64", 8, None, "<u8"),
    _make("uint32", 4, None, "<u4"),
    _make("uint16", 2, None, "<u2"),
    _make("uint8", 1, "U8", "u1"),
    _make("bool", 1, "BOOL", "?"),
    _make("complex32", 4, None, "<u4", complex_=True),
    _make("complex64", 8, "C64", "<c8", complex_=True),
    _make("complex128", 16, None, "<c16", complex_=True),
    _make("qint8", 1, None, "i1"),
    _make("quint8", 1, None, "u1"),
    _make("qint32", 4, None, "<i4"),
    _make("quint4x2", 1, None, "u1"),
    _make("quint2x4", 1, None, "u1"),
    *(_make(name, 1, None, "u1") for name in ("bits1x8", "bits2x4", "bits4x2", "bits8")),
    _make("bits16", 2, None, "<u2"),
    *(_make(f"uint{n}", 1, None, "u1") for n in range(1, 8)),
    *(_make(f"int{n}", 1, None, "i1") for n in range(1, 8)),
]
#: Every type by torch's name for it, aliases included (``torch.half`` is ``float16``).
BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
for _alias, _name in (("half", "float16"), ("float", "float32"), ("double", "float64"),
                      ("short", "int16"), ("int", "int32"), ("long", "int64"),
                      ("chalf", "complex32"), ("cfloat", "complex64"),
                      ("cdouble", "complex128"), ("bit", "uint1")):
    BY_NAME[_alias] = BY_NAME[_name]

float64, float32, float16, bfloat16 = (BY_NAME[n] for n in ("float64", "float32", "float16", "bfloat16"))
int64, int32, int16, int8, uint8 = (BY_NAME[n] for n in ("int64", "int32", "int16", "int8", "uint8"))
bool_ = BY_NAME["bool"]
complex64 = BY_NAME["complex64"]

#: The safetensors code of each type safetensors holds, and the type of each code.
SAFETENSORS_DTYPES: dict[DType, str] = {d: d.code for d in _ALL if d.code is not None}
BY_CODE: dict[str, DType] = {code: d for d, code in SAFETENSORS_DTYPES.items()}

#: The storage classes ``torch.save`` pickles (``torch/storage.py``
#: ``_dtype_to_storage_type_map``) and their types.
STORAGE_TYPES: dict[str, DType] = {
    "DoubleStorage": float64,
    "FloatStorage": float32,
    "HalfStorage": float16,
    "BFloat16Storage": bfloat16,
    "LongStorage": int64,
    "IntStorage": int32,
    "ShortStorage": int16,
    "CharStorage": int8,
    "ByteStorage": uint8,
    "BoolStorage": bool_,
    "ComplexFloatStorage": complex64,
    "ComplexDoubleStorage": BY_NAME["complex128"],
    "QUInt8Storage": BY_NAME["quint8"],
    "QInt8Storage": BY_NAME["qint8"],
    "QInt32Storage": BY_NAME["qint32"],
    "UntypedStorage": uint8,
}


def as_dtype(value: Any) -> DType:
    """``value`` as a :class:`DType`: a DType, a ``torch.dtype``, or a name (``float32``,
    ``torch.float32``).

    Raises:
        ValueError: no such type.
    """
    if isinstance(value, DType):
        return value
    name = str(value).removeprefix("torch.") if _is_torch_dtype(value) or isinstance(value, str) else None
    found = BY_NAME.get(name) if name is not None else None
    if found is None:
        raise ValueError(f"not a tensor element type: {value!r}")
    return found


def to_torch(array: np.ndarray, dtype: DType) -> Any:
    """A torch tensor sharing ``array``'s memory, of ``dtype`` (imports torch): of ``array``'s
    shape where its elements are of ``dtype``'s size, else 1-D (``array`` is then bytes)."""
    import torch

    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    shape = array.shape if array.itemsize == dtype.itemsize else (-1,)
    return torch.from_numpy(flat).view(dtype.torch).reshape(shape)


def from_torch(tensor: Any) -> tuple[np.ndarray, DType]:
    """A CPU torch tensor's elements as a numpy array (sharing memory where the tensor is
    contiguous) and their type."""
    dtype = as_dtype(tensor.dtype)
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    import torch

    flat = host.contiguous().reshape(-1).view(torch.uint8).numpy()
    return flat.view(dtype.numpy).reshape(tuple(host.shape)), dtype
