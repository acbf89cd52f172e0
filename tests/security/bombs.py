"""Resource bombs: small files that would cost unbounded memory or time if read naively.

Each bomb is written on demand and read through the public API in a child process whose
address space is capped (``RLIMIT_AS``), one JSON line per bomb on stdout, so that a bomb
that escaped its limit shows up as a failure of that bomb rather than a dead test run.

Usage: ``python -c 'from security.bombs import main; main()' FOLDER [NAME ...]``
(with ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from security.make_corpus import (
    HOST_TENSOR,
    INERT,
    Asm,
    G,
    Payload,
    call,
    replace_data_pkl,
    splice_pickle,
    torch_zip,
)

#: Address space a bomb may add to the reader's process (torch itself maps several GiB).
EXTRA_ADDRESS_SPACE = 2 << 30
STORAGE = HOST_TENSOR.numpy().tobytes()  # 12 float32 elements
REBUILD = G("torch._utils", "_rebuild_tensor_v2")


def _tensor(size: Any = (3, 4), stride: Any = (4, 1), offset: Any = 0, key: str = "0",
            numel: Any = 12) -> Callable[[Asm], None]:
    def pid(a: Asm) -> None:
        a.push(("storage", G("torch", "FloatStorage"), key, "cpu", numel)).op(b"Q")

    return lambda a: a.call(REBUILD, pid, offset, size, stride, False,
                            call(G("collections", "OrderedDict")))


def _file(folder: Path, name: str, root: Any, storages: dict[str, bytes] | None = None) -> Path:
    path = folder / f"{name}.pt"
    path.write_bytes(torch_zip(Asm().push(root).finish(), {"0": STORAGE} if storages is None
                               else storages))
    return path


def _raw(folder: Path, name: str, pickle_bytes: bytes) -> Path:
    return _file_bytes(folder, name, torch_zip(pickle_bytes, {"0": STORAGE}))


def _file_bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / f"{name}.pt"
    path.write_bytes(data)
    return path


def _doubling_list(levels: int) -> Callable[[Asm], None]:
    """A list holding the previous list twice, ``levels`` deep: 2**levels leaves."""

    def expr(a: Asm) -> None:
        a.op(b"]")
        for _ in range(levels):
            slot = a.put()
            a.op(b"0](").get(slot).get(slot).op(b"e")

    return expr


def _doubling_tuple(levels: int) -> Callable[[Asm], None]:
    def expr(a: Asm) -> None:
        a.op(b")")
        for _ in range(levels):
            slot = a.put()
            a.get(slot).op(b"\x86")

    return expr


def _patch_sizes(data: bytes, member: str, size: int) -> bytes:
    """Make the central directory claim ``size`` bytes for ``member`` (data unchanged)."""
    name = member.encode()
    at = data.index(b"PK\x01\x02")  # central directory file header (APPNOTE.TXT 4.3.12)
    while data[at + 46 : at + 46 + struct.unpack_from("<H", data, at + 28)[0]] != name:
        at = data.index(b"PK\x01\x02", at + 4)
    return data[: at + 20] + struct.pack("<II", size, size) + data[at + 28 :]


def _zip(members: list[tuple[str, bytes, int]]) -> bytes:
    out = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w") as z:
            for name, body, compression in members:
                z.writestr(name, body, compress_type=compression)
    return out.getvalue()


def _key_above_many_tensors(folder: Path, name: str) -> Path:
    def many(a: Asm) -> None:
        a.push(REBUILD)
        func = a.put()
        a.op(b"0").push((lambda b: b.push(("storage", G("torch", "FloatStorage"), "0", "cpu",
                                           12)).op(b"Q"), 0, (3, 4), (4, 1), False, None))
        args = a.put()
        a.op(b"0").op(b"}(")
        for i in range(20000):
            a.push(i).get(func).get(args).op(b"R")
        a.op(b"u")

    return _file(folder, name, {"k" * 100_000: many})


def _engine_state_bomb(folder: Path, name: str, value: Callable[[Asm], None]) -> Path:
    """A small checkpoint whose ``mp_rank_00`` file gets ``value`` under an extra key."""
    from exporter.samples import TINY, write_checkpoint

    ckpt = folder / name
    write_checkpoint(ckpt, TINY, step=8, dp=2)
    mp = ckpt / "mp_rank_00_model_states.pt"
    data = mp.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        host = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    payload = Payload("bomb", lambda _: value, INERT, ())
    mp.write_bytes(replace_data_pkl(data, splice_pickle(host, payload, "", key="bomb")))
    return ckpt


@dataclass(frozen=True)
class Bomb:
    """A hostile file and what reading it must give.

    Attributes:
        build: writes the file (or checkpoint folder) into a folder, returns its path.
        action: ``load`` (load_torch_file, read every tensor, render JSON), ``convert``
            (export_checkpoint of a folder), ``unpickle`` (safe_unpickle of the data.pkl).
        error: a regex the ExporterError message must match; None when reading succeeds.
    """

    build: Callable[[Path, str], Path]
    action: str
    error: str | None


def _compressed(member: str) -> Callable[[Path, str], Path]:
    # 64 MiB of zeros deflate to about 64 KiB: a classic zip bomb, if it were inflated.
    zeros = bytes(64 << 20)

    def build(folder: Path, name: str) -> Path:
        pickle_bytes = Asm().push({"weight": _tensor(), "pad": zeros if member == "data.pkl"
                                   else b""}).finish()
        storage = zeros if member == "data/0" else STORAGE
        members = [("archive/data.pkl", pickle_bytes,
                    zipfile.ZIP_DEFLATED if member == "data.pkl" else zipfile.ZIP_STORED),
                   ("archive/data/0", storage,
                    zipfile.ZIP_DEFLATED if member == "data/0" else zipfile.ZIP_STORED),
                   ("archive/version", b"3\n", zipfile.ZIP_STORED)]
        if member == "data/0":
            members[0] = ("archive/data.pkl", Asm().push({"weight": _tensor(
                size=(len(zeros) // 4,), stride=(1,), numel=len(zeros) // 4)}).finish(),
                zipfile.ZIP_STORED)
        return _file_bytes(folder, name, _zip(members))

    return build


def _renamed(prefix: str) -> Callable[[Path, str], Path]:
    def build(folder: Path, name: str) -> Path:
        body = Asm().push({"weight": _tensor()}).finish()
        return _file_bytes(folder, name, _zip([(f"{prefix}/data.pkl", body, 0),
                                               (f"{prefix}/data/0", STORAGE, 0),
                                               (f"{prefix}/version", b"3\n", 0)]))

    return build


def _deep(opener: bytes, closer: bytes, depth: int = 100_000, tail: bytes = b"") -> bytes:
    return b"\x80\x02" + opener * depth + tail + closer * depth + b"."


#: Tuples nested 200,000 deep without a MARK: TUPLE1, TUPLE2 and TUPLE3 chains, MARK ... TUPLE
#: frames around TUPLE1 runs, and a call that returns its argument (``_rebuild_parameter``)
#: applied to ``((x,),)`` again and again.
DEEP_TUPLES = {
    "tuple1": b"N" + b"\x85" * 200_000,
    "tuple2": b"NN\x86" + b"N\x86" * 200_000,
    "tuple3": b"NNN\x87" + b"NN\x87" * 200_000,
    "mark_tuple_and_tuple1": b"(" * 500 + b"N" + (b"\x85" * 399 + b"t") * 500,
    "rebuild_parameter": b"ctorch._utils\n_rebuild_parameter\nq\x00" + b"h\x00" * 199_999
                         + b"N" + b"\x85\x85R" * 200_000,
}

BOMBS: dict[str, Bomb] = {
    "numel_past_storage": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(size=(1000,), stride=(1,))}), "load",
        "past the storage"),
    "offset_past_storage": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(offset=2**62)}), "load", "past the storage"),
    "offset_beyond_int64": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(offset=2**70)}), "load",
        "invalid storage offset"),
    "negative_offset": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(offset=-5)}), "load",
        "invalid storage offset"),
    "negative_stride": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(size=(4,), stride=(-1,))}), "load",
        "invalid stride"),
    "size_beyond_int64": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(size=(2**64,), stride=(1,))}), "load",
        "invalid shape"),
    "numel_overflows_int64": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(size=(2**40, 2**40), stride=(2**40, 1))}),
        "load", "past the storage"),
    "megabyte_wide_integer_in_shape": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(size=(2 ** (8 << 20), 2 ** (8 << 20)),
                                                    stride=(1, 1))}),
        "load", "invalid shape"),
    "storage_numel_beyond_int64": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(numel=2**64)}), "load", "invalid size"),
    "storage_member_missing": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(key="7")}), "load", "missing member"),
    "storage_member_short": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(numel=1000)}), "load", "should hold"),
    "storage_member_past_end_of_file": Bomb(
        lambda f, n: _file_bytes(f, n, _patch_sizes(
            torch_zip(Asm().push({"weight": _tensor()}).finish(), {"0": STORAGE}),
            "archive/data/0", 2**31)),
        "load", "past the end of the file"),
    "data_pkl_claims_600_mb": Bomb(
        lambda f, n: _file_bytes(f, n, _patch_sizes(
            torch_zip(Asm().push({"weight": _tensor()}).finish(), {"0": STORAGE}),
            "archive/data.pkl", 600 << 20)),
        "load", "past the end of the file|over the .* limit"),
    "compressed_data_pkl": Bomb(_compressed("data.pkl"), "load", "compressed"),
    "compressed_storage": Bomb(_compressed("data/0"), "load", "compressed"),
    "member_names_climb_out": Bomb(_renamed("../../evil"), "load", "outside the archive"),
    "member_names_absolute": Bomb(_renamed("/tmp/evil"), "load", "outside the archive"),
    "member_name_twice": Bomb(
        lambda f, n: _file_bytes(f, n, _zip([
            ("archive/data.pkl", Asm().push({"weight": _tensor()}).finish(), 0),
            ("archive/data.pkl", Asm().push({"weight": _tensor(offset=1, size=(11,),
                                                               stride=(1,))}).finish(), 0),
            ("archive/data/0", STORAGE, 0)])),
        "load", "twice"),
    "nesting_mark_list": Bomb(lambda f, n: _raw(f, n, _deep(b"(", b"l")), "load",
                              "nests deeper"),
    "nesting_empty_list_append": Bomb(
        lambda f, n: _raw(f, n, b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."), "load",
        "nests deeper"),
    "nesting_tuple1": Bomb(lambda f, n: _raw(f, n, b"\x80\x02N" + b"\x85" * 100_000 + b"."),
                           "load", "nests tuples deeper than 1000"),
    # hash() of a tuple recurses in C without a recursion check: as a dict key, 200,000
    # nested tuples overflow the C stack.
    **{f"nesting_{kind}_as_dict_key": Bomb(
        lambda f, n, body=body: _raw(f, n, b"\x80\x02}" + body + b"Ns."), "unpickle",
        "nests tuples deeper than 1000")
       for kind, body in DEEP_TUPLES.items()},
    "nesting_dict_setitem": Bomb(
        lambda f, n: _raw(f, n, b"\x80\x02" + b"}K\x00" * 100_000 + b"}" + b"s" * 100_000
                          + b"."),
        "load", "nests deeper"),
    "memo_doubling_list": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(), "state": _doubling_list(60)}), "load",
        "shared references"),
    "memo_doubling_list_in_engine_state": Bomb(
        lambda f, n: _engine_state_bomb(f, n, _doubling_list(60)), "convert",
        "shared references"),
    "memo_doubling_tuple_as_dict_key": Bomb(
        lambda f, n: _raw(f, n, Asm().op(b"}").push(_doubling_tuple(60)).op(b"Ns").finish()),
        "unpickle", "hashing steps"),
    "memo_doubling_tuple_into_set": Bomb(
        lambda f, n: _raw(f, n, Asm().call(G("builtins", "set"),
                                           lambda a: a.push(_doubling_tuple(60)).op(b"\x85")
                                           ).finish()),
        "unpickle", "hashing steps"),
    "memo_doubling_tuple_into_frozenset": Bomb(
        lambda f, n: _raw(f, n, Asm(proto=4).op(b"(").push(_doubling_tuple(60)).op(b"\x91")
                          .finish()),
        "unpickle", "hashing steps"),
    "memo_doubling_tuple_in_error_message": Bomb(
        lambda f, n: _raw(f, n, Asm().push(_doubling_tuple(60)).op(b"Q").finish()), "load",
        "unsupported persistent id"),
    "memo_index_2_to_31": Bomb(lambda f, n: _raw(f, n, b"\x80\x02K\x01r\xff\xff\xff\x7f."),
                               "load", "memo index"),
    "length_prefix_2_to_60": Bomb(
        lambda f, n: _raw(f, n, b"\x80\x04\x8d" + struct.pack("<Q", 2**60) + b"abc."), "load",
        "malformed pickle"),
    "long_key_above_20000_tensors": Bomb(_key_above_many_tensors, "load", "key path is longer"),
    "integer_of_5000_digits": Bomb(
        lambda f, n: _file(f, n, {"weight": _tensor(), "big": 10**5000}), "load", None),
}


def _run(action: str, path: Path) -> None:
    from exporter.errors import ExporterError
    from exporter.pipeline.export import export_checkpoint
    from exporter.torchfile import load_torch_file, to_json
    from exporter.torchfile.unpickler import safe_unpickle

    if action == "load":
        tf = load_torch_file(path)
        for _, ref in tf.tensors():
            ref.read()
        json.dumps(to_json(tf.obj), allow_nan=False)
    elif action == "unpickle":
        with zipfile.ZipFile(path) as z:
            safe_unpickle(z.read("archive/data.pkl"))
    elif action == "convert":
        out = path.parent / f"{path.name}-out"
        try:
            export_checkpoint(path, out)
        except ExporterError:
            if out.exists() or list(path.parent.glob(f".{out.name}.*")):
                raise AssertionError(f"{out} left behind by a failed export") from None
            raise
    else:
        raise ValueError(action)


def run_bomb(folder: Path, name: str) -> dict[str, Any]:
    """Build and read one bomb; its outcome, message, seconds and peak RSS so far."""
    from exporter.errors import ExporterError

    bomb = BOMBS[name]
    path = bomb.build(folder, name)
    start = time.perf_counter()
    try:
        _run(bomb.action, path)
        outcome, message = "ok", ""
    except ExporterError as exc:
        outcome, message = type(exc).__name__, str(exc)
    except BaseException as exc:  # noqa: BLE001 - reported, the parent test fails on it
        outcome, message = f"crash:{type(exc).__name__}", str(exc)[:500]
    return {
        "name": name,
        "outcome": outcome,
        "message": message[:1000],
        "seconds": time.perf_counter() - start,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def cap_address_space() -> int:
    """Cap this process's address space at what it uses now plus ``EXTRA_ADDRESS_SPACE``."""
    with open("/proc/self/status") as fh:
        size_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
    cap = size_kb * 1024 + EXTRA_ADDRESS_SPACE
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0])
    folder.mkdir(parents=True, exist_ok=True)
    import exporter.pipeline.export  # noqa: F401 - imported before the cap, like any reader process
    import exporter.samples  # noqa: F401

    cap = cap_address_space()
    print(json.dumps({"address_space_cap": cap}), flush=True)
    for name in args[1:] or list(BOMBS):
        print(json.dumps(run_bomb(folder, name)), flush=True)
