"""When a batch shared with the forked reader frees this process's core
(``ForkedLoads.wait_idle``): the export's model files start there on two cores.

The child is played here: it takes indices from the claims pipe and answers on a socket, so
each moment of the batch is set by the test, not by the speed of two processes.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from exporter.torchfile.forkchild import END as _END
from exporter.torchfile.forkchild import HEADER as _HEADER
from exporter.torchfile.forkchild import INDEX as _INDEX
from exporter.torchfile.forkchild import read_index as _read_index
from exporter.torchfile.forked import ForkedLoads


@pytest.fixture
def batch(tmp_path: Path):
    paths = [tmp_path / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(3)]
    claims, filled = os.pipe()
    os.write(filled, b"".join(_INDEX.pack(i) for i in range(len(paths))))
    os.close(filled)
    here, child = socket.socketpair()
    reader = SimpleNamespace(pid=-1, channel=here, batch_ended=lambda cleanly: None)
    loads = ForkedLoads(reader, [(claims, list(range(len(paths))))], paths)  # type: ignore[arg-type]
    yield SimpleNamespace(paths=paths, loads=loads, claims=claims, child=child)
    loads._close_claims(0)  # where not every index was read from the pipe
    child.close()
    here.close()


def _waiting(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def test_a_core_is_free_once_only_the_child_s_files_are_left(batch) -> None:
    paths, loads = batch.paths, batch.loads
    assert _read_index(batch.claims) == 0  # the child takes the first file
    idle = _waiting(loads.wait_idle)
    assert not loads.claim(paths[0])
    assert loads.claim(paths[1])
    idle.join(0.3)
    assert idle.is_alive(), "free while this process still had a file to claim"
    assert loads.claim(paths[2])  # every index taken: this process reads its last file
    idle.join(0.3)
    assert idle.is_alive(), "free before this process waited for the child"
    getter = _waiting(loads.get, paths[0])  # its own files read, it waits for the child's
    idle.join(5)
    assert not idle.is_alive(), "still waiting while this process only waits for the child"
    assert getter.is_alive()  # the child has not answered: the core is free, not the batch over
    batch.child.sendall(_HEADER.pack(_END, 0))  # the child ends the batch without sending it
    getter.join(5)
    assert not getter.is_alive()


def test_a_child_that_ends_frees_the_core_too(batch) -> None:
    # This process read nothing of the child's, or the child took nothing: its end is enough.
    idle = _waiting(batch.loads.wait_idle)
    idle.join(0.3)
    assert idle.is_alive()
    batch.child.sendall(_HEADER.pack(_END, 0))
    idle.join(5)
    assert not idle.is_alive()


def test_waiting_for_the_child_with_files_still_to_claim_is_not_idle(batch) -> None:
    # A step of several tensor-parallel ranks reads its units in turn: this process may wait
    # for a file of the first unit while the second's are yet to be claimed, and read them.
    paths, loads = batch.paths, batch.loads
    assert _read_index(batch.claims) == 0  # the child takes the first file
    assert not loads.claim(paths[0])  # this process takes the next index, 1, for later
    idle = _waiting(loads.wait_idle)
    getter = _waiting(loads.get, paths[0])
    idle.join(0.3)
    assert getter.is_alive()
    assert idle.is_alive(), "free while index 2 was still to be claimed"
    batch.child.sendall(_HEADER.pack(_END, 0))
    getter.join(5)
    idle.join(5)
    assert not idle.is_alive() and not getter.is_alive()


def _pipe(indices: list[int]) -> int:
    read_end, write_end = os.pipe()
    os.write(write_end, b"".join(_INDEX.pack(i) for i in indices))
    os.close(write_end)
    return read_end


@pytest.fixture
def two_pipes(tmp_path: Path):
    # Index 2 is the child's to read first (a file whose pickle the others do not share).
    paths = [tmp_path / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(4)]
    ours, theirs = _pipe([0, 1, 3]), _pipe([2])
    here, child = socket.socketpair()
    reader = SimpleNamespace(pid=-1, channel=here, batch_ended=lambda cleanly: None)
    loads = ForkedLoads(reader, [(ours, [0, 1, 3]), (theirs, [2])], paths)  # type: ignore[arg-type]
    yield SimpleNamespace(paths=paths, loads=loads, ours=ours, theirs=theirs)
    loads._close_claims(0)
    loads._close_claims(1)
    child.close()
    here.close()


def test_this_process_claims_its_pipe_first_and_the_child_s_last(two_pipes) -> None:
    paths, loads = two_pipes.paths, two_pipes.loads
    outside = paths[0].with_name("other.pt")
    assert loads.order([*paths, outside]) == [4, 0, 1, 3, 2]  # not shared: read here first
    assert _read_index(two_pipes.theirs) == 2  # the child takes its own first,
    assert _read_index(two_pipes.ours) == 0  # then the next of this process's pipe
    assert not loads.claim(paths[0])  # this process takes index 1 meanwhile
    assert loads.claim(paths[1])
    assert loads.claim(paths[3])
    assert not loads.claim(paths[2])
    assert loads.claim(outside)


def test_a_file_the_child_has_not_taken_is_claimed_here(two_pipes) -> None:
    paths, loads = two_pipes.paths, two_pipes.loads
    assert [loads.claim(paths[i]) for i in loads.order(paths)] == [True] * 4
    # Nothing left for the child; the file of its pipe is this process's: read here, no wait.
    assert _read_index(two_pipes.theirs) is None and _read_index(two_pipes.ours) is None
    assert loads.get(paths[2]) is None


def test_the_child_reads_its_own_pipe_then_this_process_s() -> None:
    from exporter.torchfile.forkchild import _claimed

    fds = [_pipe([2, 5]), _pipe([0, 1, 3, 4])]
    try:
        assert list(_claimed(fds)) == [2, 5, 0, 1, 3, 4]
    finally:
        for fd in fds:
            os.close(fd)


def test_indices_a_pipe_cannot_hold_are_read_here(tmp_path: Path) -> None:
    from exporter.torchfile.forkchild import claims_pipe

    fd, count = claims_pipe(list(range(40_000)))  # 160 kB: more than a pipe holds
    try:
        assert 0 < count < 40_000
        taken = []
        while (index := _read_index(fd)) is not None:
            taken.append(index)
        assert taken == list(range(count))
    finally:
        os.close(fd)
    paths = [tmp_path / f"f{i}.pt" for i in range(3)]
    ours, _ = claims_pipe([0, 1])
    here, child = socket.socketpair()
    reader = SimpleNamespace(pid=-1, channel=here, batch_ended=lambda cleanly: None)
    loads = ForkedLoads(reader, [(ours, [0, 1])], paths)  # type: ignore[arg-type]
    try:
        assert _read_index(ours) == 0  # the child's
        assert loads.claim(paths[2])  # in no pipe: read here, without taking an index
        assert _read_index(ours) == 1
        assert loads.get(paths[2]) is None
    finally:
        loads._close_claims(0)
        child.close()
        here.close()
