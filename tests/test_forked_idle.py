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

from exporter.torchfile.forked import _END, _HEADER, _INDEX, ForkedLoads, _read_index


@pytest.fixture
def batch(tmp_path: Path):
    paths = [tmp_path / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(3)]
    claims, filled = os.pipe()
    os.write(filled, b"".join(_INDEX.pack(i) for i in range(len(paths))))
    os.close(filled)
    here, child = socket.socketpair()
    reader = SimpleNamespace(pid=-1, channel=here, batch_ended=lambda cleanly: None)
    loads = ForkedLoads(reader, claims, paths)  # type: ignore[arg-type]
    yield SimpleNamespace(paths=paths, loads=loads, claims=claims, child=child)
    if loads._claims >= 0:  # not every index was read from the pipe
        loads._close_claims()
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
