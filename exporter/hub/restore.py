"""Resume a pushing build from the Hub's state: steps already committed are not built again.

A coordinator that restarts with its ``--out`` folder finds its steps complete there. One that
starts with an empty folder (a new machine, a lost disk) asks the target dataset instead: a
step whose checkpoint index shard is on the remote, with every output file it lists there
under the sha256 it records, is committed. :func:`restore_committed_steps` writes such a step
back into the local archive as a build that pushed it with ``--delete-after-push`` leaves it:
both index shards and the small files (downloaded: a few kB), and a ``.push/step{N}.json``
record of the tensor files, which stay on the Hub. The build then counts the step complete.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from exporter.archive.layout import checkpoint_index_file, tensor_index_file
from exporter.archive.push_state import PushRecord, write_push_record
from exporter.files import write_bytes_atomic
from exporter.hub.publish import REPO_TYPE, Publisher

log = logging.getLogger(__name__)


def restore_committed_steps(publisher: Publisher, steps: Iterable[int]) -> list[int]:
    """Write into the local archive those of ``steps`` the remote holds whole; returns them."""
    remote = publisher.prepare()
    restored = []
    for step in steps:
        shard = checkpoint_index_file(step)
        if shard not in remote or tensor_index_file(step) not in remote:
            continue
        data = _download(publisher, shard)
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
        if len(rows) != 1:
            continue
        outputs = rows[0]["output_files"]
        entries = {e["path"]: e for e in outputs}
        if not all(path in remote and remote[path].size == e["bytes"] for path, e in entries.items()):
            continue
        lfs = {path: e["sha256"] for path, e in entries.items() if remote[path].sha256 is not None}
        if any(remote[path].sha256 != sha for path, sha in lfs.items()):
            continue
        small = {path: _download(publisher, path) for path in sorted(set(entries) - set(lfs))}
        if any(hashlib.sha256(data).hexdigest() != entries[path]["sha256"]
               for path, data in small.items()):
            continue
        root = publisher.root
        for path, content in small.items():
            write_bytes_atomic(root / path, content)
        write_push_record(root, step, PushRecord(publisher.repo_id, REPO_TYPE, publisher.revision,
                                                 None, lfs))
        write_bytes_atomic(root / tensor_index_file(step),
                           _download(publisher, tensor_index_file(step)))
        write_bytes_atomic(root / shard, data)
        log.info("step %d: committed to %s already, restored its index", step, publisher.repo_id)
        restored.append(step)
    return restored


def _download(publisher: Publisher, path: str) -> bytes:
    """The content of ``path`` at the branch head (small files only)."""
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(prefix="neox-restore-") as folder:
        local = publisher._call(f"download {path}", lambda: hf_hub_download(
            publisher.repo_id, path, repo_type=REPO_TYPE, revision=publisher.revision,
            local_dir=folder, token=publisher.api.token))
        return Path(local).read_bytes()
