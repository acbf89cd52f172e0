"""Scale-out builds: Hub -> Ray workers -> Hub, with no storage shared between the nodes.

A Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``), each node with
a scratch folder of its own (``NEOX_EXPORTER_SCRATCH``) and no path into the coordinator's
archive (tasks are not given it), builds a tiny run from the test Hub into a dataset on the
same server, while the test kills one worker with SIGKILL in the middle of its step's
download. The result must equal a local build tensor for tensor.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray
from hubserver import HubServer
from ray.cluster_utils import Cluster

from exporter.hub.calls import RetryPolicy
from exporter.hub.source import HubSource
from exporter.pipeline.export import ExportOptions
from exporter.pipeline.remote import SCRATCH_ENV
from exporter.pipeline.run import BuildOptions, build
from exporter.samples import TINY, write_run
from exporter.sources import LocalSource

REPO = "EleutherAI/neox-ckpt-pythia-tiny"
STEPS = (0, 1, 2, 4)
BROKEN_STEP = 16
TARGET = "neox/scaled"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    write_run(tmp_path / "run", TINY, steps=STEPS, dp=2)
    return tmp_path / "run"


@pytest.fixture
def cluster(hub_server: HubServer, tmp_path: Path) -> Iterator[tuple[Cluster, list[Path]]]:
    """Three single-CPU nodes, each with its own scratch folder; started after ``hub_server``
    so that every node's workers inherit the client's environment (endpoint, token)."""
    scratches = [tmp_path / f"node{i}-scratch" for i in range(3)]
    for folder in scratches:
        folder.mkdir()
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "env_vars": {SCRATCH_ENV: str(scratches[0])},
        # A node killed outright is declared dead within seconds, not the default ~30 s.
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                           "health_check_initial_delay_ms": 500}})
    for folder in scratches[1:]:
        nodes.add_node(num_cpus=1, env_vars={SCRATCH_ENV: str(folder)})
    nodes.wait_for_nodes()
    try:
        yield nodes, scratches
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()


def index_digests(archive: Path, step: int) -> dict[tuple[str, str], str]:
    table = pq.read_table(archive / "index" / "tensors" / f"step{step}.parquet",
                          columns=["kind", "name", "digest"]).to_pylist()
    return {(row["kind"], row["name"]): row["digest"] for row in table}


def output_files(archive: Path, step: int) -> dict[str, str]:
    (row,) = pq.read_table(archive / "index" / "checkpoints" / f"step{step}.parquet").to_pylist()
    return {entry["path"]: entry["sha256"] for entry in row["output_files"]}


class WorkerKiller:
    """Kills, once, the process downloading a ``.pt`` file from the server (not this one).

    With ``raylets``, the pids of the raylets of nodes that may die, it kills the whole node
    of such a process instead: its raylet and every process below it, with SIGKILL.
    """

    def __init__(self, server: HubServer, raylets: list[int] | None = None) -> None:
        self.server = server
        self.raylets = raylets
        self.killed: tuple[int, str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.killed is None:
            for transfer in self.server.link.transfers():
                if transfer.method == "GET" and transfer.path.endswith(".pt"):
                    pid = self._owner(transfer.port)
                    if pid is None or pid == os.getpid():
                        continue
                    if self.raylets is None:
                        os.kill(pid, signal.SIGKILL)
                    else:
                        parents = {p.pid for p in psutil.Process(pid).parents()}
                        raylet = next((r for r in self.raylets if r in parents), None)
                        if raylet is None:
                            continue  # on the head node, which must stay
                        node = psutil.Process(raylet)
                        for victim in [node, *node.children(recursive=True)]:
                            victim.kill()
                    self.killed = (pid, transfer.path)
                    return
            self._stop.wait(0.01)

    def _owner(self, port: int) -> int | None:
        for conn in psutil.net_connections(kind="tcp"):
            if (conn.laddr and conn.laddr.port == port and conn.raddr
                    and conn.raddr.port == self.server.port):
                return conn.pid
        return None


def test_a_three_node_ray_build_uploads_from_workers_and_survives_a_killed_worker(
    hub_server: HubServer, run: Path, cluster: tuple[Cluster, list[Path]], tmp_path: Path,
) -> None:
    nodes, scratches = cluster
    for step in STEPS:
        hub_server.seed_repo(REPO, run / f"step{step}", branch=f"step{step}")
    # A step that fails for its own reasons: a branch without its checkpoint's files.
    hub_server.seed_repo(REPO, {"README.md": b"not a checkpoint\n"}, branch=f"step{BROKEN_STEP}")
    export = ExportOptions()
    build(LocalSource(run), tmp_path / "local", BuildOptions(export=export, quiet=True))
    # Slow enough that a download is still running when the killer looks for one.
    hub_server.link.limit(download=600_000)

    archive = tmp_path / "archive"
    source = HubSource(f"hf://{REPO}", tmp_path / "coordinator-downloads",
                       retry=RetryPolicy(attempts=5, base_delay=0.05))
    with WorkerKiller(hub_server) as killer:
        summary = build(source, archive, BuildOptions(
            export=export, executor="ray", ray_address=nodes.address, workers=3,
            push_to=TARGET, steps_per_commit=2, keep_going=True, quiet=True))

    assert killer.killed is not None, "no worker was caught mid-download"
    status = {o.step: o.status for o in summary.outcomes}
    assert status == {**dict.fromkeys(STEPS, "done"), BROKEN_STEP: "failed"}
    (broken,) = [o for o in summary.outcomes if o.status == "failed"]
    assert "no checkpoint" in (broken.error or "").lower() or "layer" in (broken.error or "")
    remote = hub_server.list_files(TARGET, repo_type="dataset")
    for step in STEPS:
        # Tensor for tensor: the index the coordinator wrote holds the local build's digests.
        assert index_digests(archive, step) == index_digests(tmp_path / "local", step)
        # Every output file is on the Hub with the local build's content.
        for path, sha256 in output_files(tmp_path / "local", step).items():
            assert remote[path].sha256 == sha256, path
            assert not path.endswith(".safetensors") or not (archive / path).exists()
        assert f"index/tensors/step{step}.parquet" in remote
    # The coordinator's downloads folder was never used; each node cleaned its scratch.
    assert not (tmp_path / "coordinator-downloads").exists()
    used = [folder for folder in scratches if (folder / "neox-exporter").is_dir()]
    assert len(used) >= 2
    for folder in used:
        assert list((folder / "neox-exporter").iterdir()) == []
    # Two batches of two steps, then the card: no duplicate commit despite the retry.
    assert hub_server.commit_count(TARGET, repo_type="dataset") == 1 + 2 + 1
    assert summary.push is not None and sorted(summary.push.pushed_steps) == list(STEPS)


def test_a_ray_node_killed_outright_loses_only_its_step_which_is_retried_elsewhere(
    hub_server: HubServer, run: Path, cluster: tuple[Cluster, list[Path]], tmp_path: Path,
) -> None:
    nodes, _ = cluster
    for step in STEPS:
        hub_server.seed_repo(REPO, run / f"step{step}", branch=f"step{step}")
    export = ExportOptions(include=("model", "state"))
    build(LocalSource(run), tmp_path / "local", BuildOptions(export=export, quiet=True))
    hub_server.link.limit(download=300_000)
    raylets = [node.all_processes["raylet"][0].process.pid for node in nodes.worker_nodes]

    source = HubSource(f"hf://{REPO}", tmp_path / "downloads",
                       retry=RetryPolicy(attempts=5, base_delay=0.05))
    with WorkerKiller(hub_server, raylets) as killer:
        summary = build(source, tmp_path / "archive", BuildOptions(
            export=export, executor="ray", ray_address=nodes.address, workers=3,
            push_to=TARGET, quiet=True))

    assert killer.killed is not None, "no worker node was caught mid-download"
    assert {o.step: o.status for o in summary.outcomes} == dict.fromkeys(STEPS, "done")
    for step in STEPS:
        assert index_digests(tmp_path / "archive", step) == index_digests(tmp_path / "local", step)
