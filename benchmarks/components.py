"""Where an export's CPU time goes: each stage of the pipeline run alone, one thread, in order.

    python benchmarks/components.py CHECKPOINT_FOLDER [CHUNK_BYTES]

For every tensor the export writes, chunk by chunk: read it (``TensorJob.chunks``: ``preadv``
into a new tensor), compute its statistics, hash it with sha256 (the file digest) and with
BLAKE3 (the tensor digest), write it to a scratch file through the page cache and to another
one around it (``O_DIRECT``, as the export writes; fsync at the end of each). Prints one JSON
object: bytes and CPU seconds per stage, plus the planning time (finding the files and reading
their pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import blake3
import numpy as np

from exporter.convert.direct import DirectFile
from exporter.convert.stats import StatsAccumulator
from exporter.convert.stream import CHUNK_BYTES
from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.config import load_neox_config
from exporter.neox.model import plan_model
from exporter.neox.state import read_engine_state
from exporter.neox.zero import plan_optimizer


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def profile(folder: Path, chunk_bytes: int = CHUNK_BYTES) -> dict[str, float]:
    costs = dict.fromkeys(("plan", "read", "statistics", "sha256 (file digest)",
                           "blake3 (tensor digest)", "write + fsync, page cache",
                           "write + fsync, O_DIRECT (the export's)"), 0.0)
    cached, direct = "write + fsync, page cache", "write + fsync, O_DIRECT (the export's)"
    start = _cpu()
    files = scan_checkpoint(folder)
    cfg = load_neox_config(files.configs)
    model = plan_model(files, cfg)
    engine = read_engine_state(files, exported_module=True)
    optimizer = plan_optimizer(files, model, engine)
    costs["plan"] = _cpu() - start
    jobs = [*model.jobs, *engine.tensor_jobs]
    if optimizer is not None:
        jobs += optimizer.jobs
    nbytes = 0
    with tempfile.NamedTemporaryFile(dir=folder.parent, prefix=".components-") as scratch, \
            tempfile.TemporaryDirectory(dir=folder.parent, prefix=".components-") as tmp:
        around = DirectFile.create(Path(tmp) / "direct.bin")
        for job in jobs:
            chunks = job.chunks(chunk_bytes)
            while True:
                start = _cpu()
                chunk = next(chunks, None)
                costs["read"] += _cpu() - start
                if chunk is None:
                    break
                nbytes += chunk.nbytes
                start = _cpu()
                StatsAccumulator().update(chunk, job.dtype)
                costs["statistics"] += _cpu() - start
                raw = memoryview(chunk.reshape(-1).view(np.uint8))
                start = _cpu()
                hashlib.sha256(raw)
                costs["sha256 (file digest)"] += _cpu() - start
                start = _cpu()
                blake3.blake3(raw)
                costs["blake3 (tensor digest)"] += _cpu() - start
                start = _cpu()
                scratch.write(raw)
                costs[cached] += _cpu() - start
                if around is not None:
                    start = _cpu()
                    around.write(raw)
                    costs[direct] += _cpu() - start
        start = _cpu()
        scratch.flush()
        os.fsync(scratch.fileno())
        costs[cached] += _cpu() - start
        if around is None:
            del costs[direct]
        else:
            start = _cpu()
            around.flush()
            os.fsync(around.fileno())
            around.close()
            costs[direct] += _cpu() - start
    return {"bytes": nbytes, **costs}


if __name__ == "__main__":
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else CHUNK_BYTES
    print(json.dumps(profile(Path(sys.argv[1]), chunk)))
