"""The prescan's fast path (exporter/torchfile/opscan.py): it proves the pickles that
``torch.save``, ``pickle`` and DeepSpeed write acceptable, declines every hostile one, and never
accepts what the exact walker would refuse, so that refusals and their messages are unchanged.
"""

from __future__ import annotations

import collections
import json
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from prescan_cases import data_pkl, mutate, pickles_of, random_object, random_stream
from security.bombs import BOMBS, DEEP_TUPLES
from security.make_corpus import Asm, G, write_corpus

from exporter.errors import ExporterError
from exporter.samples import TINY, write_checkpoint
from exporter.samples.runs import RunConfig
from exporter.torchfile import prescan
from exporter.torchfile.opbounds import opcode_starts
from exporter.torchfile.opmemo import memo_reads
from exporter.torchfile.opscan import _DEPTH, WORK_PER_VALUE, _Frames, proves_safe

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"


def fast(data: bytes) -> bool:
    return proves_safe(data, prescan.MAX_OPCODES, prescan.MAX_DEPTH, prescan.MAX_HASH_WORK)


def outcome(check: object, data: bytes) -> str | None:
    """None if ``check(data)`` accepts, else the error's type and message."""
    try:
        check(data)  # type: ignore[operator]
    except ExporterError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def walker_work(monkeypatch: pytest.MonkeyPatch, data: bytes) -> int | None:
    """The hashing steps the exact walker spends on ``data``, None if it refuses it."""
    seen: list[prescan._Prescan] = []

    class Recording(prescan._Prescan):
        def __init__(self) -> None:
            super().__init__()
            seen.append(self)

    with monkeypatch.context() as patch:
        patch.setattr(prescan, "_Prescan", Recording)
        if outcome(prescan.walk, data) is not None:
            return None
    return seen[0].work


def _torch_files(folder: Path) -> list[bytes]:
    out = []
    for path in sorted(folder.rglob("*.pt")):
        with zipfile.ZipFile(path) as z:
            out.append(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
    return out


def _optimizer_like(tensors: int) -> dict[str, object]:
    betas = (0.9, 0.95)  # one tuple object, shared by every param group as torch.optim does
    return {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2),
                          "exp_avg_sq": torch.zeros(2)} for i in range(tensors // 3)},
            "param_groups": [{"lr": 1e-4, "betas": betas, "params": list(range(g, tensors // 3,
                                                                               2))}
                             for g in range(2)]}


def _adamw_state() -> dict[str, object]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()},
                                   {"params": model[1].parameters(), "weight_decay": 0.0}])
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _tied() -> dict[str, object]:
    weight = torch.randn(5, 3)
    return {"embed_in.weight": weight, "embed_out.weight": weight, "n": [weight, weight[1:]]}


REAL = {
    "module_state_dict": lambda: torch.nn.Sequential(torch.nn.Linear(4, 3),
                                                     torch.nn.LayerNorm(3)).state_dict(),
    "tensors_in_lists_and_dicts": lambda: {"a": [torch.ones(2), {"b": (torch.zeros(3),)}],
                                           "c": [[torch.arange(4)] * 2]},
    "optimizer_like_3000_tensors": lambda: _optimizer_like(3000),
    "adamw_state_dict": _adamw_state,
    "tied_tensors": _tied,
}


@pytest.mark.parametrize("name", list(REAL))
def test_torch_save_pickles_take_the_fast_path(name: str) -> None:
    data = data_pkl(REAL[name]())
    assert fast(data)
    assert outcome(prescan.walk, data) is None


def test_shared_values_in_real_pickles_are_read_as_such() -> None:
    """The tied tensor is a shared call result, the betas pair a shared flat tuple."""
    tied = memo_reads(opcode_starts(data_pkl(_tied()), 10**6))
    assert tied is not None and len(tied.calls) == 2 and len(set(tied.calls.tolist())) == 1
    groups = memo_reads(opcode_starts(data_pkl(_optimizer_like(30)), 10**6))
    assert groups is not None and groups.extra == 2


PLAIN = {"nested": {"a": [1, 2.5, None, True, "x", "é", b"raw", 10**40, -(2**70)],
                    "b": ({"c": (1, (2, (3,)))},), "d": {1, 2}, "e": frozenset({"f"}),
                    "g": collections.OrderedDict(h=[[], {}, ()]), "i": bytearray(b"ij"),
                    "k": ["same"] * 3, "pair": [(1, "a")] * 4, "empty": ""},
         "long": [{"key": i, "value": [float(i)] * 3} for i in range(3000)],
         "strings": [f"w{i}" for i in range(5000)] + ["c\n" * 50, "x" * 70000]}


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_pickles_take_the_fast_path(name: str, protocol: int) -> None:
    data = pickle.dumps(PLAIN[name], protocol=protocol)
    assert fast(data)
    assert outcome(prescan.walk, data) is None


def test_deepspeed_files_take_the_fast_path(tmp_path: Path) -> None:
    """Files written by real DeepSpeed (tests/fixtures) and by the sample writer with a
    small comm bucket (many tensors per optimizer file)."""
    write_checkpoint(tmp_path / "ckpt", TINY, step=8, dp=2,
                     config=RunConfig(max_elements_per_comm=64))
    files = _torch_files(FIXTURES) + _torch_files(tmp_path / "ckpt")
    assert len(files) > 90
    assert [len(f) for f in files if not fast(f)] == []


def test_prescan_decides_by_the_fast_path_when_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    walked: list[bytes] = []
    monkeypatch.setattr(prescan, "walk", walked.append)
    prescan.prescan(data_pkl(_optimizer_like(300)))
    assert walked == []
    prescan.prescan(b"\x80\x02N0N.")  # POP: left to the walker
    assert walked == [b"\x80\x02N0N."]


def _opcode_offsets(data: bytes) -> list[int]:
    return [at for _, _, at in pickletools.genops(data)]


DESYNC = {
    # Chains started inside these arguments read GLOBALs, long lengths and newlines.
    "global_lookalikes": pickle.dumps([f"c{i}\nX\nc" + "B\xff\x00\x00" * 30
                                       for i in range(3000)], protocol=2),
    "one_byte_opcodes": pickle.dumps([None] * 70000 + [()] * 70000, protocol=4),
    "dense_across_windows": pickle.dumps([i * 7 for i in range(500000)], protocol=2),
    "blob_across_windows": pickle.dumps([list(range(1000)), bytes(range(256)) * 12000,
                                         "tail"], protocol=4),
    "blob_as_latin1_text": pickle.dumps({"a": bytes(range(256)) * 5000, "b": [1.5] * 9},
                                        protocol=2),
}


@pytest.mark.parametrize("name", list(DESYNC))
def test_opcode_starts_are_those_genops_yields(name: str) -> None:
    data = DESYNC[name]
    ops = opcode_starts(data, 10**7)
    assert ops is not None
    assert ops.starts.tolist() == _opcode_offsets(data)
    assert fast(data)


def _bomb_pickles(folder: Path) -> dict[str, list[bytes]]:
    folder.mkdir()
    out: dict[str, list[bytes]] = {}
    for name, bomb in BOMBS.items():
        path = bomb.build(folder, name)
        found = []
        for file in [path] if path.is_file() else sorted(path.rglob("*.pt")):
            try:
                with zipfile.ZipFile(file) as z:
                    found += [z.read(i) for i in z.infolist() if i.filename.endswith("data.pkl")]
            except (zipfile.BadZipFile, OSError, EOFError):
                continue  # an archive made unreadable on purpose
        out[name] = found
    return out


def _case_pickles(path: Path) -> list[bytes]:
    if not zipfile.is_zipfile(path):
        return [path.read_bytes()]  # a raw pickle, or torch's legacy format
    with zipfile.ZipFile(path) as z:
        return [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]


def test_hostile_pickles_get_the_walkers_answer(tmp_path: Path) -> None:
    """Every resource bomb and every payload of the security corpus: the prescan answers as
    the exact walker does, message included, and the fast path declines all it refuses."""
    bombs = _bomb_pickles(tmp_path / "bombs")
    corpus = {case.name: _case_pickles(case.path) for case in write_corpus(tmp_path / "corpus")}
    refused = set()
    for name, pickles in {**bombs, **corpus}.items():
        for data in pickles:
            expected = outcome(prescan.walk, data)
            assert outcome(prescan.prescan, data) == expected, name
            if expected is not None:
                refused.add(name)
                assert not fast(data), name
    # The other bombs are refused after the prescan (reading tensors, rendering the tree).
    assert {"nesting_mark_list", "nesting_tuple1", *(f"nesting_{k}_as_dict_key" for k in
                                                      DEEP_TUPLES),
            "memo_doubling_tuple_as_dict_key",
            "memo_doubling_tuple_into_set", "memo_doubling_tuple_into_frozenset",
            "memo_index_2_to_31", "length_prefix_2_to_60"} <= refused


def test_random_pickles_accepted_fast_are_accepted_by_the_walker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded: objects pickled every way, mutations of them, random opcode streams. Whenever
    the fast path accepts, the walker accepts, within the hashing bound the fast path uses."""
    rng = random.Random(20240611)
    cases = []
    for _ in range(60):
        for data in pickles_of(rng, random_object(rng)):
            cases += [data] + [mutate(rng, data) for _ in range(4)]
    cases += [random_stream(rng) for _ in range(3000)]
    accepted = shared = 0
    for data in cases:
        if not fast(data):
            continue
        accepted += 1
        work = walker_work(monkeypatch, data)
        assert work is not None, data
        ops = opcode_starts(data, 10**7)
        sharing = memo_reads(ops)
        assert work <= WORK_PER_VALUE * (len(ops.codes) + sharing.extra), data
        shared += bool(len(sharing.calls) or sharing.extra)
    assert accepted > len(cases) / 5 and len(cases) - accepted > len(cases) / 5
    assert shared > 20


def _call_many(shared: bytes, calls: int) -> bytes:
    """``[x, f(x), f(x), ...]``, ``shared`` pushing ``x`` and memoizing it in slot 0, each
    call reading it from there."""
    a = Asm().op(b"](").op(shared)
    for _ in range(calls):
        a.push(G("builtins", "f")).get(0).op(b"\x85R")
    return a.op(b"e").finish()


PUT_0 = b"r\x00\x00\x00\x00"
ORDERED_DICT = bytes(Asm(proto=0).push(G("collections", "OrderedDict")).op(b")R").out)


def test_shared_call_result_added_to_is_declined() -> None:
    filled = ORDERED_DICT + PUT_0 + b"(" + b"".join(
        b"J" + struct.pack("<i", i) + b"N" for i in range(1000)) + b"u"
    few, many = _call_many(filled, 100), _call_many(filled, 20000)
    assert not fast(few) and not fast(many)
    assert outcome(prescan.prescan, few) is None
    assert "hashing steps" in outcome(prescan.prescan, many)
    assert fast(_call_many(ORDERED_DICT + PUT_0, 20000))  # read, never added to


def test_shared_flat_tuple_counts_as_a_copy_per_read() -> None:
    flat = b"(" + b"N" * 1000 + b"t" + PUT_0
    assert fast(_call_many(flat, 100))
    many = _call_many(flat, 20000)  # 20,000 reads of 1,001 values
    assert not fast(many)
    assert "hashing steps" in outcome(prescan.prescan, many)
    nested = b"(" + b"N" * 10 + b"tq\x01h\x01\x85" + PUT_0  # holds a memo read of a tuple
    assert not fast(_call_many(nested, 3))
    assert outcome(prescan.prescan, _call_many(nested, 3)) is None


@pytest.mark.parametrize("data", [
    b"\x80\x02K\x01q\x00K\x02q\x00h\x00h\x00\x86.",  # an index set twice: the latest counts
    b"\x80\x02(K\x01K\x02tq\x00h\x00h\x00\x86.",  # a flat tuple read twice
    b"\x80\x02N.trailing bytes",  # genops stops at STOP
    b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01a\x94h\x00\x86.",  # FRAME, MEMOIZE
])
def test_regular_corners_are_accepted(data: bytes) -> None:
    assert fast(data)
    assert outcome(prescan.walk, data) is None


@pytest.mark.parametrize("data", [
    b"\x80\x02K\x01q\x01h\x00.",  # a slot never set
    b"\x80\x02K\x01h\x00q\x00.",  # read before it is set
    b"\x80\x02]q\x00h\x00h\x00\x86.",  # a list read twice
    b"\x80\x02K\x01q\x00q\x01h\x01.",  # memoized twice
    b"\x80\x04K\x01\x94K\x02q\x05h\x00\x86.",  # MEMOIZE and PUT mixed
    b"\x80\x02X\x02\x00\x00\x00\xff\xfe.",  # not UTF-8
    b"\x80\x02cmod\\x41\nname\n.",  # an escape in GLOBAL
    b"\x80\x02cm\xc3\xa9\nname\n.",  # not ASCII in GLOBAL
    b"\x80\x02T\xff\xff\xff\xffabc.",  # a negative length
    b"\x80\x02X\x09\x00\x00\x00abc.",  # a length past the end
    b"\x80\x02K\x01",  # no STOP
    b"\x80\x02N\xfe.",  # an unknown opcode
    b"\x80\x02N2\x86.",  # DUP
    b"\x80\x02I1\n.",  # protocol 0's INT
    b"\x80\x02Nt.",  # TUPLE without MARK
    b"\x80\x02(\x86.",  # TUPLE2 reaching under a MARK
    b"\x80\x02Nq\x04.",  # memo index past the opcode count
])
def test_irregular_pickles_go_to_the_walker(data: bytes) -> None:
    assert not fast(data)
    assert outcome(prescan.prescan, data) == outcome(prescan.walk, data)


def test_limits_are_those_of_the_walker() -> None:
    data = b"\x80\x02(((N\x85ttt."  # 10 opcodes, MARK depth 3, tuples 4 deep, work bound 20
    assert proves_safe(data, 10, 4, 20)
    assert not proves_safe(data, 9, 4, 20)
    assert not proves_safe(data, 10, 3, 20)
    assert not proves_safe(data, 10, 4, 19)
    lists = b"\x80\x02(((Nlll."  # MARK depth 3, no tuple
    assert proves_safe(lists, 9, 3, 18)
    assert not proves_safe(lists, 9, 2, 18)


TUPLE_DEPTH = "pickle nests tuples deeper than 1000 levels"


def _as_dict_key(body: bytes) -> bytes:
    return b"\x80\x02}" + body + b"Ns."


def _nested(depth: int, size: int) -> bytes:
    """A tuple ``depth`` deep: TUPLE1, TUPLE2 or TUPLE3 around the previous one."""
    item = b"N" * (size - 1)
    return item + b"N" + (bytes([0x84 + size]) + item) * (depth - 1) + bytes([0x84 + size])


def _unpickle_in_child(pickles: dict[str, bytes]) -> dict[str, str | None]:
    """safe_unpickle of each pickle in a child process, so that a crash fails the test."""
    script = (
        "import json, sys\n"
        "from exporter.errors import ExporterError\n"
        "from exporter.torchfile.unpickler import safe_unpickle\n"
        "for name, data in json.load(sys.stdin).items():\n"
        "    try:\n"
        "        safe_unpickle(data.encode('latin-1'))\n"
        "        out = None\n"
        "    except ExporterError as exc:\n"
        "        out = f'{type(exc).__name__}: {exc}'\n"
        "    print(json.dumps({name: out}), flush=True)\n"
    )
    given = json.dumps({k: v.decode("latin-1") for k, v in pickles.items()})
    result = subprocess.run([sys.executable, "-c", script], input=given, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    return {k: v for line in result.stdout.splitlines() for k, v in json.loads(line).items()}


def test_tuples_nested_200000_deep_are_refused_not_hashed() -> None:
    """As dict keys these overflow the C stack in hash(): both prescan paths refuse them."""
    pickles = {name: _as_dict_key(body) for name, body in DEEP_TUPLES.items()}
    for data in pickles.values():
        assert not fast(data)
        assert outcome(prescan.walk, data) == f"UnsafePickleError: {TUPLE_DEPTH}"
    assert _unpickle_in_child(pickles) == dict.fromkeys(pickles, f"UnsafePickleError: "
                                                                 f"{TUPLE_DEPTH}")


@pytest.mark.parametrize("size", [1, 2, 3])
def test_tuple_nesting_limit(size: int) -> None:
    pickles = {f"{depth}": _as_dict_key(_nested(depth, size)) for depth in (999, 1000, 1001)}
    assert fast(pickles["999"]) and fast(pickles["1000"]) and not fast(pickles["1001"])
    expected = {"999": None, "1000": None, "1001": f"UnsafePickleError: {TUPLE_DEPTH}"}
    assert {k: outcome(prescan.walk, v) for k, v in pickles.items()} == expected
    assert _unpickle_in_child(pickles) == expected


def test_call_results_count_as_deep_as_their_arguments() -> None:
    """``_rebuild_parameter(x)`` returns ``x``: around ``((x,),)``, each call nests once more."""
    func = b"ctorch._utils\n_rebuild_parameter\nq\x00"

    def nest(calls: int) -> bytes:
        return _as_dict_key(func + b"h\x00" * (calls - 1) + b"N" + b"\x85\x85R" * calls)

    assert outcome(prescan.prescan, nest(400)) is None
    assert fast(nest(400)) and not fast(nest(600))
    assert outcome(prescan.walk, nest(600)) == f"UnsafePickleError: {TUPLE_DEPTH}"
    # A tuple read from the memo, inside tuples, counts as deep as it was when memoized.
    shared = _as_dict_key(b"N" + b"\x85" * 600 + b"q\x01" + b"h\x01" + b"\x85" * 600)
    assert not fast(shared)
    assert outcome(prescan.walk, shared) == f"UnsafePickleError: {TUPLE_DEPTH}"


def test_tuples_nested_through_memo_reads() -> None:
    """Each call result is memoized and read back inside the next call's ``((x,),)``: the
    fast path takes one such read, declines a read of a value that holds a read, and the
    walker counts every one."""

    def hops(count: int) -> bytes:
        body = b"ctorch._utils\n_rebuild_parameter\nq\x00h\x00N\x85\x85Rr\x01\x00\x00\x00"
        for k in range(1, count):
            body += b"h\x00j" + struct.pack("<I", k) + b"\x85\x85Rr" + struct.pack("<I", k + 1)
        return _as_dict_key(body)

    assert fast(hops(1)) and not fast(hops(2))
    assert outcome(prescan.walk, hops(499)) is None
    assert outcome(prescan.walk, hops(501)) == f"UnsafePickleError: {TUPLE_DEPTH}"


@pytest.mark.parametrize("name", list(REAL))
def test_tuple_nesting_bound_is_tight_on_torch_save_pickles(name: str) -> None:
    """The fast path's bound on tuple nesting stays a few levels, far from the limit."""
    data = data_pkl(REAL[name]())
    assert proves_safe(data, prescan.MAX_OPCODES, 8, prescan.MAX_HASH_WORK)


def test_tuple_nesting_bound_covers_the_walkers_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded: whenever the fast path accepts, no tuple the walker sees nests deeper than the
    fast path's bound."""
    deepest = [0]

    class Recording(prescan._Value):
        __slots__ = ()

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            deepest[0] = max(deepest[0], self.depth)

    monkeypatch.setattr(prescan, "_Value", Recording)
    rng = random.Random(20240612)
    cases = [random_stream(rng) for _ in range(3000)]
    for _ in range(30):
        cases += list(pickles_of(rng, random_object(rng)))
    nested = 0
    for data in cases:
        if not fast(data):
            continue
        ops = opcode_starts(data, 10**7)
        frames = _Frames(ops.codes, np.cumsum(_DEPTH[ops.codes], dtype=np.int32))
        bound = frames.tuple_nesting(memo_reads(ops))
        deepest[0] = 0
        assert outcome(prescan.walk, data) is None
        assert deepest[0] <= bound, data
        nested += deepest[0] >= 3
    assert nested > 50
