"""Gathering a step's optimizer state: each kind's parameters read in chunks, kinds on threads.

    python benchmarks/gather.py CHECKPOINT_FOLDER [--kinds master,exp_avg,exp_avg_sq]
                                [--chunk-bytes 1048576] [--block-bytes N]

Plans the optimizer of ``CHECKPOINT_FOLDER`` (the pickles read once, the plan kept out of the
collector's walks as the export keeps it), then reads every parameter of each kind in
``--kinds`` with ``ParamSlices.chunks``, one thread per kind started together, as the export's
file threads read them, and discards the chunks. ``--block-bytes`` overrides
``gather.BLOCK_BYTES`` (the bytes gathered at once for parameters of many small spans; the
chunk size turns it off). Prints one JSON object: seconds of the whole, and per kind the
bytes, seconds and thread CPU seconds. Compare the Pythia-layout checkpoint of ``run.py`` with
its many-interval twin (``WORKDIR/checkpoint-wide4-dp8[-bucket11250]``).
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
from pathlib import Path
from typing import Any

from exporter.neox.checkpoint import scan_checkpoint
from exporter.neox.config import read_neox_config
from exporter.neox.model import plan_model
from exporter.neox.state import read_engine_state
from exporter.neox.zero import gather, plan_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kinds", default="master,exp_avg,exp_avg_sq")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--block-bytes", type=int, default=None)
    args = parser.parse_args()
    if args.block_bytes is not None:
        gather.BLOCK_BYTES = args.block_bytes
    files = scan_checkpoint(args.folder)
    model = plan_model(files, read_neox_config(files))
    plan = plan_optimizer(files, model, read_engine_state(files, exported_module=True))
    if plan is None:
        raise SystemExit(f"{args.folder}: no ZeRO optimizer files")
    gc.freeze()
    kinds: dict[str, Any] = {}

    def read(kind: str) -> None:
        size, start, cpu = 0, time.perf_counter(), time.thread_time()
        for params in plan.units.values():
            for param in params:
                for chunk in param.chunks(kind)(args.chunk_bytes):
                    size += chunk.nbytes
        kinds[kind] = {"bytes": size, "seconds": round(time.perf_counter() - start, 3),
                       "cpu_seconds": round(time.thread_time() - cpu, 3)}

    threads = [threading.Thread(target=read, args=(kind,)) for kind in args.kinds.split(",")]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"folder": str(args.folder), "seconds": round(time.perf_counter() - start, 3),
                      "block_bytes": gather.BLOCK_BYTES, "kinds": kinds}))


if __name__ == "__main__":
    main()
