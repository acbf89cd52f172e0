"""Write a sample checkpoint for the benchmarks, once.

    python sample.py FOLDER SHAPE DP [--steps N] [--bucket-elements N]

Shapes: ``160m`` and ``410m`` (Pythia's), ``wide4`` (Pythia's vocabulary, 4 blocks of hidden
size 1024: one 206 MB fp32 tensor, 2.2 GB in all with dp=8), ``quick`` (a smoke-test size),
``trained-small`` (small enough to train for a few real steps on a CPU). ``--steps`` > 0 trains
that many steps first (``exporter.samples.write_checkpoint(train_steps=...)``), else the values
are synthetic. ``--bucket-elements`` is DeeperSpeed's ``max_elements_per_comm`` (GPT-NeoX's
``reduce_bucket_size``; Pythia's 5e8 puts each param group in one comm interval): a small
bucket cuts each group into thousands of comm intervals, so every optimizer file holds tens of
thousands of small tensors. A ``.complete`` stamp lets later runs reuse the folder. Prints one
JSON object: the folder, its size, the byte size of the largest parameter in fp32 and the
number of tensors in the first optimizer file's partitions.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from exporter.samples import (
    PYTHIA_160M,
    PYTHIA_410M,
    ModelShape,
    RunConfig,
    parameter_specs,
    write_checkpoint,
)
from exporter.samples.zero import PYTHIA_MAX_ELEMENTS_PER_COMM

SHAPES = {
    "160m": PYTHIA_160M,
    "410m": PYTHIA_410M,
    "wide4": ModelShape(num_layers=4, hidden_size=1024, num_heads=16, vocab_size=50304,
                        seq_length=2048, name="wide4"),
    "quick": ModelShape(num_layers=2, hidden_size=256, num_heads=4, vocab_size=8192,
                        seq_length=128, name="quick"),
    "trained-small": ModelShape(num_layers=2, hidden_size=256, num_heads=4, vocab_size=2048,
                                seq_length=64, name="trained-small"),
}


def main(folder: Path, shape_name: str, dp: int, steps: int = 0,
         bucket_elements: int = PYTHIA_MAX_ELEMENTS_PER_COMM) -> dict[str, object]:
    shape = SHAPES[shape_name]
    stamp = folder / ".complete"
    wanted = json.dumps({"shape": shape_name, "dp": dp, "steps": steps, "seed": 0,
                         "bucket_elements": bucket_elements})
    if not (stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(folder, ignore_errors=True)
        config = None
        if bucket_elements != PYTHIA_MAX_ELEMENTS_PER_COMM:
            config = RunConfig(max_elements_per_comm=bucket_elements)
        truth = write_checkpoint(folder, shape, dp=dp, train_steps=steps, config=config)
        stamp.write_text(wanted)
        (folder / ".intervals").write_text(
            str(sum(p.num_comm_intervals for p in truth.partitions[0])))
    largest = max(spec.numel for spec in parameter_specs(shape, tp=1, tp_rank=0))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name[0] != ".")
    intervals = int((folder / ".intervals").read_text())
    return {"folder": str(folder), "bytes": size, "largest_fp32_bytes": largest * 4,
            "comm_intervals": intervals, "optimizer_file_tensors": 3 * intervals}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("dp", type=int)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--bucket-elements", type=int, default=PYTHIA_MAX_ELEMENTS_PER_COMM)
    args = parser.parse_args()
    print(json.dumps(main(args.folder, args.shape, args.dp, args.steps, args.bucket_elements)))
