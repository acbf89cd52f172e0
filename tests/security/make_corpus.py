"""Hostile torch checkpoints and pickles, written on demand for the security tests.

Every case carries a payload that creates its own marker file if anything executes it:
``os.system``, ``subprocess``, ``eval``/``exec``, ``getattr``/``__import__`` chains, operator
and functools gadgets, ``importlib``/``pkgutil`` resolution, nested ``torch.load`` and
``pickle.loads``, payloads inside containers, tensor rebuild arguments, persistent ids and
BUILD states, every pickle protocol's call opcodes (REDUCE, INST, OBJ, NEWOBJ, NEWOBJ_EX),
extension codes registered through ``copyreg``, STACK_GLOBAL names taken from the memo or
computed, memo tricks, and the legacy (non-zip) torch format. Pickles are assembled opcode
by opcode (opcode bytes as listed in CPython ``Lib/pickletools.py``) so that nothing here
depends on pickling a live object, and wrapped into torch zip files (``<name>/data.pkl``,
``<name>/data/<key>``, ``<name>/version``, ``<name>/byteorder``; torch/serialization.py
``_save``) so that they reach the reader through its normal path.

Each payload is a *fragment*: opcodes that push exactly one value. A fragment can stand alone
(a raw pickle whose root is the payload), sit next to a real tensor in a small torch file, or
be spliced into the root dict of a real checkpoint file (:func:`splice_payload`), so that the
layer, engine-state and optimizer readers meet it inside an otherwise valid checkpoint.

The corpus is real: ``torch.load(weights_only=False)`` or ``pickle.loads`` creates the marker
of every case (the security tests check this in a throwaway process).

Usage: ``python tests/security/make_corpus.py OUT_DIR`` writes the corpus and lists it.
"""

from __future__ import annotations

import io
import shlex
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: The real tensor stored next to each payload; readers must return exactly this.
HOST_TENSOR = torch.arange(12, dtype=torch.float32).reshape(3, 4)
#: Root-dict key under which payloads are spliced into real checkpoint files.
PAYLOAD_KEY = "__payload__"
INERT = "inert"
REFUSED = "refused"


@dataclass(frozen=True)
class G:
    """A global named by a pickle (``GLOBAL module name``)."""

    module: str
    name: str


Expr = Callable[["Asm"], None]


class Asm:
    """Writes pickle opcodes; every ``push`` leaves exactly one value on the stack.

    Args:
        proto: the PROTO header (none below 2, as protocols 0 and 1 have no header).
        memo_base: first memo index to use, so fragments spliced into a host pickle do not
            overwrite memo slots the host reads later.
    """

    def __init__(self, proto: int = 2, memo_base: int = 0) -> None:
        self.out = bytearray()
        self.next_memo = memo_base
        if proto >= 2:
            self.out += bytes([0x80, proto])

    def op(self, raw: bytes) -> Asm:
        self.out += raw
        return self

    def push(self, value: Any) -> Asm:
        """Push a plain value, a :class:`G`, or run an :data:`Expr`."""
        if isinstance(value, G):
            self.op(b"c" + f"{value.module}\n{value.name}\n".encode())
        elif callable(value):
            value(self)
        elif value is None:
            self.op(b"N")
        elif isinstance(value, bool):
            self.op(b"\x88" if value else b"\x89")
        elif isinstance(value, int):
            if 0 <= value < 256:
                self.op(b"K" + bytes([value]))
            elif -(2**31) <= value < 2**31:
                self.op(b"J" + struct.pack("<i", value))
            else:
                raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                if len(raw) < 256:
                    self.op(b"\x8a" + bytes([len(raw)]) + raw)  # LONG1
                else:
                    self.op(b"\x8b" + struct.pack("<I", len(raw)) + raw)  # LONG4
        elif isinstance(value, str):
            raw = value.encode()
            self.op(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(value, bytes):
            self.op(b"B" + struct.pack("<I", len(value)) + value)
        elif isinstance(value, tuple):
            if len(value) <= 3:
                for item in value:
                    self.push(item)
                self.op([b")", b"\x85", b"\x86", b"\x87"][len(value)])
            else:
                self.op(b"(")
                for item in value:
                    self.push(item)
                self.op(b"t")
        elif isinstance(value, list):
            self.op(b"]")
            if value:
                self.op(b"(")
                for item in value:
                    self.push(item)
                self.op(b"e")
        elif isinstance(value, dict):
            self.op(b"}")
            if value:
                self.op(b"(")
                for key, item in value.items():
                    self.push(key).push(item)
                self.op(b"u")
        else:
            raise TypeError(f"cannot assemble {type(value).__name__}")
        return self

    def call(self, func: Any, *args: Any) -> Asm:
        """``func(*args)`` through REDUCE."""
        return self.push(func).push(tuple(args)).op(b"R")

    def put(self) -> int:
        index = self.next_memo
        self.next_memo += 1
        self.op(b"r" + struct.pack("<I", index))
        return index

    def get(self, index: int) -> Asm:
        return self.op(b"j" + struct.pack("<I", index))

    def finish(self) -> bytes:
        return bytes(self.out + b".")


def touch(marker: str) -> str:
    return f"touch {shlex.quote(marker)}"


def py_touch(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


def call(func: Any, *args: Any) -> Expr:
    return lambda a: a.call(func, *args)


OS_SYSTEM = G("os", "system")
IMPORT = G("builtins", "__import__")
GETATTR = G("builtins", "getattr")
IMPORT_MODULE = G("importlib", "import_module")


def _memo_get_callable(m: str) -> Expr:
    def expr(a: Asm) -> None:
        a.push(OS_SYSTEM)
        slot = a.put()
        a.op(b"0").get(slot).push((touch(m),)).op(b"R")

    return expr


def _memo_overwrite(m: str) -> Expr:
    def expr(a: Asm) -> None:
        a.push(G("torch._utils", "_rebuild_tensor_v2"))
        slot = a.put()
        a.op(b"0").push(OS_SYSTEM).op(b"r" + struct.pack("<I", slot)).op(b"0")
        a.get(slot).push((touch(m),)).op(b"R")

    return expr


def _stack_global(module: str, name: str, *args: Any) -> Expr:
    return lambda a: a.push(module).push(name).op(b"\x93").push(tuple(args)).op(b"R")


def _stack_global_memo(m: str) -> Expr:
    def expr(a: Asm) -> None:
        a.push("subprocess")
        module = a.put()
        a.op(b"0").push("check_call")
        name = a.put()
        a.op(b"0").get(module).get(name).op(b"\x93").push((["touch", m],)).op(b"R")

    return expr


def _stack_global_computed(m: str) -> Expr:
    join = call(call(GETATTR, "", "join"), ["sys", "tem"])
    return lambda a: a.push("os").push(join).op(b"\x93").push((touch(m),)).op(b"R")


def _extension(opcode: bytes, code: int, size: int, target: G) -> Callable[[str], Expr]:
    # copyreg.add_extension registers (module, name) under an integer code that EXT1/2/4 then
    # name instead of a GLOBAL (Lib/copyreg.py, Lib/pickle.py load_ext*). A process registers
    # each (module, name) once, hence one target per opcode.
    def make(m: str) -> Expr:
        def expr(a: Asm) -> None:
            a.call(G("copyreg", "add_extension"), target.module, target.name, code).op(b"0")
            a.op(opcode + code.to_bytes(size, "little")).push((touch(m),)).op(b"R")

        return expr

    return make


def _newobj_partial(m: str) -> Expr:
    # functools.partial.__new__ takes the function and its arguments, so NEWOBJ builds a
    # ready-to-call partial; the REDUCE that follows calls it.
    def expr(a: Asm) -> None:
        a.push(G("functools", "partial")).push((OS_SYSTEM, touch(m))).op(b"\x81")
        a.push(()).op(b"R")

    return expr


def _newobj_ex_partial(m: str) -> Expr:
    def expr(a: Asm) -> None:
        a.push(G("functools", "partial")).push((OS_SYSTEM, touch(m))).push({}).op(b"\x92")
        a.push(()).op(b"R")

    return expr


def _obj_opcode(m: str) -> Expr:
    # OBJ (protocol 1): MARK callable args... OBJ calls a non-class callable with the args.
    return lambda a: a.op(b"(").push(OS_SYSTEM).push(touch(m)).op(b"o")


def _inst_opcode(m: str) -> Expr:
    # INST (protocol 0): MARK args... INST module\nname\n
    return lambda a: a.op(b"(").push(touch(m)).op(b"ios\nsystem\n")


def _build_state(m: str) -> Expr:
    return lambda a: a.call(G("argparse", "Namespace")).push(call(OS_SYSTEM, touch(m))).op(b"b")


def _build_setstate_attribute(m: str) -> Expr:
    state = {"__setstate__": call(OS_SYSTEM, touch(m))}
    return lambda a: a.call(G("collections", "OrderedDict")).push(state).op(b"b")


def _nested_torch_load(inner: str) -> Expr:
    # torch.load defaults to weights_only=True since torch 2.6; a partial with
    # weights_only=False set through BUILD (functools.partial.__setstate__) restores it.
    def expr(a: Asm) -> None:
        a.call(G("functools", "partial"), G("torch", "load"))
        a.push((G("torch", "load"), (), {"weights_only": False}, None)).op(b"b")
        a.push((inner,)).op(b"R")

    return expr


@dataclass(frozen=True)
class Payload:
    """A fragment payload: ``make(marker)`` pushes a value whose unpickling runs the payload.

    Attributes:
        expect: what the reader must make of it, ``inert`` (read, kept as a record, flagged)
            or ``refused`` (an ExporterError).
        flags: globals the reader must report as unknown when the payload is kept inert.
        proto: PROTO header the payload needs (dotted names resolve from protocol 4 on).
        inner: the payload loads a second hostile torch file, written next to the case.
    """

    name: str
    make: Callable[[str], Expr]
    expect: str
    flags: tuple[str, ...]
    proto: int = 2
    inner: bool = False


def payloads() -> list[Payload]:
    """Every fragment payload (each reaches code execution under ``pickle.loads``).

    Payloads that call what another call returned (``getattr(...)(...)``, a ``partial``
    called later) are refused: the first call yields an inert record, and records cannot be
    called.
    """
    subprocess_call = G("subprocess", "call")
    return [
        Payload("os_system", lambda m: call(OS_SYSTEM, touch(m)), INERT, ("os.system",)),
        Payload("posix_system", lambda m: call(G("posix", "system"), touch(m)), INERT,
                ("posix.system",)),
        Payload("os_popen", lambda m: call(G("os", "popen"), touch(m)), INERT, ("os.popen",)),
        Payload("subprocess_popen", lambda m: call(G("subprocess", "Popen"), ["touch", m]),
                INERT, ("subprocess.Popen",)),
        Payload("subprocess_call", lambda m: call(subprocess_call, ["touch", m]), INERT,
                ("subprocess.call",)),
        Payload("subprocess_check_output",
                lambda m: call(G("subprocess", "check_output"), ["touch", m]), INERT,
                ("subprocess.check_output",)),
        Payload("subprocess_run", lambda m: call(G("subprocess", "run"), ["touch", m]), INERT,
                ("subprocess.run",)),
        Payload("builtins_eval", lambda m: call(G("builtins", "eval"), py_touch(m)), INERT,
                ("builtins.eval",)),
        Payload("builtins_exec", lambda m: call(G("builtins", "exec"), py_touch(m)), INERT,
                ("builtins.exec",)),
        Payload("python2_builtin_eval", lambda m: call(G("__builtin__", "eval"), py_touch(m)),
                INERT, ("builtins.eval",)),
        Payload("import_getattr_chain",
                lambda m: call(call(GETATTR, call(IMPORT, "os"), "system"), touch(m)), REFUSED,
                ("builtins.getattr", "builtins.__import__")),
        Payload("operator_attrgetter",
                lambda m: call(call(call(G("operator", "attrgetter"), "system"),
                                    call(IMPORT, "os")), touch(m)),
                REFUSED, ("operator.attrgetter", "builtins.__import__")),
        Payload("operator_methodcaller",
                lambda m: call(call(G("operator", "methodcaller"), "system", touch(m)),
                               call(IMPORT_MODULE, "os")),
                REFUSED, ("operator.methodcaller", "importlib.import_module")),
        Payload("functools_partial",
                lambda m: call(call(G("functools", "partial"), OS_SYSTEM, touch(m))), REFUSED,
                ("functools.partial", "os.system")),
        Payload("functools_reduce",
                lambda m: call(call(G("functools", "reduce"), GETATTR, ["system"],
                                    call(IMPORT_MODULE, "os")), touch(m)),
                REFUSED, ("functools.reduce", "importlib.import_module")),
        Payload("importlib_import_module",
                lambda m: call(call(GETATTR, call(IMPORT_MODULE, "subprocess"), "call"),
                               ["touch", m]),
                REFUSED, ("importlib.import_module",)),
        Payload("pkgutil_resolve_name",
                lambda m: call(call(G("pkgutil", "resolve_name"), "os:system"), touch(m)), REFUSED,
                ("pkgutil.resolve_name",)),
        Payload("timeit_timeit",
                lambda m: call(G("timeit", "timeit"), py_touch(m), "pass",
                               G("time", "perf_counter"), 1),
                INERT, ("timeit.timeit",)),
        Payload("numpy_runstring",
                lambda m: call(G("numpy.testing._private.utils", "runstring"), py_touch(m), {}),
                INERT, ("numpy.testing._private.utils.runstring",)),
        Payload("nested_pickle_loads",
                lambda m: call(G("pickle", "loads"),
                               Asm().push(call(OS_SYSTEM, touch(m))).finish()),
                INERT, ("pickle.loads",)),
        Payload("nested_torch_load", _nested_torch_load, REFUSED, ("torch.load",), inner=True),
        Payload("in_dict_value", lambda m: lambda a: a.push({"k": call(OS_SYSTEM, touch(m))}),
                INERT, ("os.system",)),
        Payload("in_list_item", lambda m: lambda a: a.push([1, call(OS_SYSTEM, touch(m)), 3]),
                INERT, ("os.system",)),
        Payload("in_ordered_dict",
                lambda m: call(G("collections", "OrderedDict"),
                               [("a", call(OS_SYSTEM, touch(m)))]),
                INERT, ("os.system",)),
        Payload("in_set", lambda m: call(G("builtins", "set"), [call(OS_SYSTEM, touch(m))]),
                INERT, ("os.system",)),
        Payload("as_dict_key", lambda m: lambda a: a.push({call(OS_SYSTEM, touch(m)): 1}),
                INERT, ("os.system",)),
        Payload("deep_in_containers",
                lambda m: lambda a: a.push({"a": [{"b": (call(OS_SYSTEM, touch(m)),)}]}),
                INERT, ("os.system",)),
        Payload("memo_get_callable", _memo_get_callable, INERT, ("os.system",)),
        Payload("memo_overwrite_safe_slot", _memo_overwrite, INERT, ("os.system",)),
        Payload("stack_global", lambda m: _stack_global("os", "system", touch(m)), INERT,
                ("os.system",)),
        Payload("stack_global_names_from_memo", _stack_global_memo, INERT,
                ("subprocess.check_call",)),
        Payload("stack_global_computed_name", _stack_global_computed, REFUSED,
                ("builtins.getattr",)),
        Payload("dotted_name_behind_torch",
                lambda m: _stack_global("torch", "serialization.os.system", touch(m)), INERT,
                ("torch.serialization.os.system",), proto=4),
        Payload("dotted_name_to_builtins",
                lambda m: _stack_global("builtins", "getattr.__self__.exec", py_touch(m)), INERT,
                ("builtins.getattr.__self__.exec",), proto=4),
        Payload("ext1_copyreg", _extension(b"\x82", 0xF1, 1, OS_SYSTEM), REFUSED,
                ("copyreg.add_extension",)),
        Payload("ext2_copyreg", _extension(b"\x83", 0xF1F2, 2, G("posix", "system")), REFUSED,
                ("copyreg.add_extension",)),
        Payload("ext4_copyreg",
                _extension(b"\x84", 0x1F2F3F4, 4, G("subprocess", "getoutput")), REFUSED,
                ("copyreg.add_extension",)),
        Payload("copyreg_reconstructor",
                lambda m: call(G("copyreg", "_reconstructor"), G("subprocess", "Popen"),
                               G("subprocess", "Popen"), ["touch", m]),
                INERT, ("subprocess.Popen",)),
        Payload("newobj_partial", _newobj_partial, REFUSED, ("functools.partial",)),
        Payload("newobj_ex_partial", _newobj_ex_partial, REFUSED, ("functools.partial",),
                proto=4),
        Payload("obj_opcode", _obj_opcode, INERT, ("os.system",)),
        Payload("inst_opcode", _inst_opcode, INERT, ("os.system",)),
        Payload("build_state_is_payload", _build_state, INERT, ("os.system",)),
        Payload("build_sets_setstate_attribute", _build_setstate_attribute, INERT,
                ("os.system",)),
    ]


# Tensor cases: a hostile value in one argument of torch/_utils.py
# _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
# metadata) or of the storage's persistent id ('storage', storage_type, key, location, numel)
# (torch/serialization.py _save persistent_id).
TENSOR_CASES: dict[str, tuple[str, str]] = {
    "rebuild_storage_is_payload": ("storage", REFUSED),
    "rebuild_offset_is_payload": ("offset", REFUSED),
    "rebuild_size_is_payload": ("size", REFUSED),
    "rebuild_stride_is_payload": ("stride", REFUSED),
    "rebuild_requires_grad_is_payload": ("requires_grad", INERT),
    "rebuild_hooks_is_payload": ("hooks", INERT),
    "rebuild_metadata_is_payload": ("metadata", INERT),
    "persistent_id_is_payload": ("pid", REFUSED),
    "persistent_id_type_is_payload": ("pid_type", REFUSED),
    "persistent_id_key_is_payload": ("pid_key", REFUSED),
    "persistent_id_location_is_payload": ("pid_location", INERT),
    "persistent_id_numel_is_payload": ("pid_numel", REFUSED),
    "storage_class_called": ("storage_called", REFUSED),
    "rebuild_from_type_v2_calls_payload": ("from_type_v2", REFUSED),
    "rebuild_parameter_of_payload": ("parameter", INERT),
}


def _tensor_expr(slot: str, payload: Expr, key: str = "0") -> Expr:
    """A ``_rebuild_tensor_v2`` of HOST_TENSOR's shape on storage ``key``, hostile at ``slot``."""

    def pick(name: str, default: Any) -> Any:
        return payload if slot == name else default

    def pid(a: Asm) -> None:
        if slot == "pid":
            a.push(payload)
        else:
            a.push(("storage", pick("pid_type", G("torch", "FloatStorage")), pick("pid_key", key),
                    pick("pid_location", "cpu"), pick("pid_numel", 12)))
        a.op(b"Q")

    def storage(a: Asm) -> None:
        if slot == "storage_called":
            a.call(G("torch", "FloatStorage"), payload)
        elif slot == "storage":
            a.push(payload)
        else:
            pid(a)

    args = (storage, pick("offset", 0), pick("size", (3, 4)), pick("stride", (4, 1)),
            pick("requires_grad", False), pick("hooks", call(G("collections", "OrderedDict"))),
            *((payload,) if slot == "metadata" else ()))
    if slot == "from_type_v2":
        return call(G("torch._tensor", "_rebuild_from_type_v2"), payload, G("torch", "Tensor"),
                    args, {})
    tensor = call(G("torch._utils", "_rebuild_tensor_v2"), *args)
    if slot == "parameter":
        return call(G("torch._utils", "_rebuild_parameter"), payload, False,
                    call(G("collections", "OrderedDict")))
    return tensor


def _protocol0(m: str) -> bytes:
    return f"cos\nsystem\n(S'{touch(m)}'\ntR.".encode()


def _protocol0_inst(m: str) -> bytes:
    return f"(S'{touch(m)}'\nios\nsystem\n.".encode()


def _protocol1_obj(m: str) -> bytes:
    return b"(cos\nsystem\n" + Asm(proto=0).push(touch(m)).out + b"o."


def _protocol3_bytes(m: str) -> bytes:
    return Asm(proto=3).call(OS_SYSTEM, touch(m).encode()).finish()


def _protocol4_frame(m: str) -> bytes:
    body = Asm(proto=0)
    body.op(b"\x8c\x0asubprocess\x94\x8c\x04call\x94\x93\x94").push((["touch", m],)).op(b"R.")
    return b"\x80\x04\x95" + struct.pack("<Q", len(body.out)) + bytes(body.out)


def _protocol5_bytearray(m: str) -> bytes:
    a = Asm(proto=5).op(b"]").op(b"(")
    a.op(b"\x96" + struct.pack("<Q", 4) + b"data").push(call(OS_SYSTEM, touch(m)))
    return bytes(a.op(b"e").finish())


def _protocol5_next_buffer(m: str) -> bytes:
    # NEXT_BUFFER needs out-of-band buffers, which no reader of files passes: refused, but
    # only after the call before it was unpickled.
    a = Asm(proto=5).op(b"]").op(b"(").push(call(OS_SYSTEM, touch(m))).op(b"\x97\x98")
    return bytes(a.op(b"e").finish())


#: Whole pickles (not fragments): name -> (writer, expected outcome, flagged globals).
WHOLE_PICKLES: dict[str, tuple[Callable[[str], bytes], str, tuple[str, ...]]] = {
    "protocol0_reduce": (_protocol0, INERT, ("os.system",)),
    "protocol0_inst": (_protocol0_inst, INERT, ("os.system",)),
    "protocol1_obj": (_protocol1_obj, INERT, ("os.system",)),
    "protocol3_bytes_argument": (_protocol3_bytes, INERT, ("os.system",)),
    "protocol4_frame_memoize_stack_global": (_protocol4_frame, INERT, ("subprocess.call",)),
    "protocol5_bytearray8": (_protocol5_bytearray, INERT, ("os.system",)),
    "protocol5_next_buffer": (_protocol5_next_buffer, REFUSED, ("os.system",)),
}


@dataclass(frozen=True)
class Case:
    """One file of the corpus.

    Attributes:
        name: unique case name (also the file stem).
        path: the file.
        marker: the file its payload would create.
        loader: ``torch`` (give it to ``load_torch_file``) or ``pickle`` (raw pickle bytes for
            ``safe_unpickle``).
        expect: ``inert`` or ``refused``.
        flags: globals reported as unknown when inert.
        host_tensor: the file also holds HOST_TENSOR under ``weight``.
        payload: the fragment payload it was made from (None for whole pickles).
    """

    name: str
    path: Path
    marker: Path
    loader: str
    expect: str
    flags: tuple[str, ...] = ()
    host_tensor: bool = False
    payload: Payload | None = field(default=None, compare=False)


def marker_dir(folder: Path) -> Path:
    return folder / "markers"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_data_pkl(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return z.read(name)


def replace_data_pkl(data: bytes, pickle_bytes: bytes) -> bytes:
    """A copy of torch zip ``data`` whose ``data.pkl`` is ``pickle_bytes`` (members stored)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            body = pickle_bytes if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info.filename, body, compress_type=zipfile.ZIP_STORED)
    return out.getvalue()


def torch_zip(pickle_bytes: bytes, storages: dict[str, bytes] | None = None,
              prefix: str = "archive") -> bytes:
    """A torch zip file holding ``pickle_bytes`` as ``data.pkl`` and the given storages."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        for key, body in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", body)
        z.writestr(f"{prefix}/version", "3\n")
        z.writestr(f"{prefix}/byteorder", "little")
    return out.getvalue()


def _memo_base(pickle_bytes: bytes) -> int:
    import pickletools

    top = -1
    for opcode, arg, _ in pickletools.genops(pickle_bytes):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            top = max(top, int(arg))
        elif opcode.name == "MEMOIZE":
            top += 1
    return top + 1


def splice_pickle(host: bytes, payload: Payload, marker: str, inner: str | None = None,
                  key: str = PAYLOAD_KEY) -> bytes:
    """``host`` (a pickle whose root is a dict) with ``root[key] = <payload>`` added at the end."""
    if not host.endswith(b"."):
        raise ValueError("host pickle does not end with STOP")
    proto = max(host[1] if host[:1] == b"\x80" else 2, payload.proto)
    head = bytes([0x80, proto]) + host[2:-1] if host[:1] == b"\x80" else host[:-1]
    a = Asm(proto=0, memo_base=_memo_base(host))
    a.push(key).push(payload.make(inner if payload.inner else marker)).op(b"s")
    return head + bytes(a.out) + b"."


def splice_payload(src: Path, dst: Path, payload: Payload, marker: Path) -> None:
    """Write ``dst``: the torch file ``src`` with ``payload`` added to its root dict."""
    data = src.read_bytes()
    inner = None
    if payload.inner:
        inner_path = dst.with_name(dst.name + ".inner")
        write_inner(inner_path, marker)
        inner = str(inner_path)
    dst.write_bytes(replace_data_pkl(data, splice_pickle(read_data_pkl(data), payload,
                                                         str(marker), inner)))


def write_inner(path: Path, marker: Path) -> None:
    """The second-stage file a nested ``torch.load`` payload loads."""
    path.write_bytes(torch_zip(Asm().push(call(OS_SYSTEM, touch(str(marker)))).finish()))


def _fragment_cases(folder: Path) -> list[Case]:
    host = _torch_bytes({"weight": HOST_TENSOR})
    cases = []
    for p in payloads():
        for loader in ("torch", "pickle"):
            name = f"{p.name}.{'pt' if loader == 'torch' else 'pkl'}"
            marker = marker_dir(folder) / name
            path = folder / name
            inner = None
            if p.inner:
                inner_path = folder / "inner" / f"{name}.pt"
                inner_path.parent.mkdir(exist_ok=True)
                write_inner(inner_path, marker)
                inner = str(inner_path)
            target = inner if p.inner else str(marker)
            if loader == "torch":
                body = replace_data_pkl(host, splice_pickle(read_data_pkl(host), p, str(marker),
                                                            inner))
            else:
                body = Asm(proto=p.proto).push(p.make(target)).finish()
            path.write_bytes(body)
            cases.append(Case(name, path, marker, loader, p.expect, p.flags,
                              host_tensor=loader == "torch", payload=p))
    return cases


def _tensor_cases(folder: Path) -> list[Case]:
    storage = HOST_TENSOR.numpy().tobytes()
    cases = []
    for name, (slot, expect) in TENSOR_CASES.items():
        marker = marker_dir(folder) / f"{name}.pt"
        payload = call(OS_SYSTEM, touch(str(marker)))
        body = Asm().push({"weight": _tensor_expr("none", payload),
                           "hostile": _tensor_expr(slot, payload)}).finish()
        path = folder / f"{name}.pt"
        path.write_bytes(torch_zip(body, {"0": storage}))
        cases.append(Case(path.name, path, marker, "torch", expect, ("os.system",),
                          host_tensor=True))
    return cases


def _whole_cases(folder: Path) -> list[Case]:
    cases = []
    for name, (writer, expect, flags) in WHOLE_PICKLES.items():
        for loader in ("torch", "pickle"):
            file_name = f"{name}.{'pt' if loader == 'torch' else 'pkl'}"
            marker = marker_dir(folder) / file_name
            body = writer(str(marker))
            path = folder / file_name
            path.write_bytes(torch_zip(body) if loader == "torch" else body)
            cases.append(Case(file_name, path, marker, loader, expect, flags))
    return cases


class _Marker:
    """Pickles (through ``__reduce__``, as ``torch.save`` would) as ``os.system('touch M')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (touch(str(self.marker)),))


def _torch_saved_cases(folder: Path) -> list[Case]:
    marker = marker_dir(folder) / "torch_save_reduce.pt"
    path = folder / "torch_save_reduce.pt"
    torch.save({"weight": HOST_TENSOR, "evil": _Marker(marker)}, path)
    system = f"{_Marker(marker).__reduce__()[0].__module__}.system"  # posix.system on Linux
    cases = [Case(path.name, path, marker, "torch", INERT, (system,), host_tensor=True)]
    marker = marker_dir(folder) / "legacy_torch_format.pt"
    path = folder / "legacy_torch_format.pt"
    torch.save({"weight": HOST_TENSOR, "evil": _Marker(marker)}, path,
               _use_new_zipfile_serialization=False)
    cases.append(Case(path.name, path, marker, "torch", REFUSED))
    marker = marker_dir(folder) / "raw_pickle_named_pt.pt"
    path = folder / "raw_pickle_named_pt.pt"
    path.write_bytes(Asm().push(call(OS_SYSTEM, touch(str(marker)))).finish())
    cases.append(Case(path.name, path, marker, "torch", REFUSED))
    return cases


TORCH_SAVED = ("torch_save_reduce.pt", "legacy_torch_format.pt", "raw_pickle_named_pt.pt")


def case_names() -> list[str]:
    """The names :func:`write_corpus` gives its cases, in order, without writing anything."""
    return (
        [f"{p.name}.{ext}" for p in payloads() for ext in ("pt", "pkl")]
        + [f"{name}.pt" for name in TENSOR_CASES]
        + [f"{name}.{ext}" for name in WHOLE_PICKLES for ext in ("pt", "pkl")]
        + list(TORCH_SAVED)
    )


def write_corpus(folder: str | Path) -> list[Case]:
    """Write every case into ``folder`` (markers would go to ``folder/markers``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker_dir(folder).mkdir(exist_ok=True)
    return (_fragment_cases(folder) + _tensor_cases(folder) + _whole_cases(folder)
            + _torch_saved_cases(folder))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_corpus.py OUT_DIR", file=sys.stderr)
        return 2
    for case in write_corpus(argv[0]):
        print(f"{case.expect:<8} {case.loader:<6} {case.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
