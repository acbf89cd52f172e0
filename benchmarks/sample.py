"""Write a sample checkpoint for the benchmarks, once: ``python sample.py FOLDER SHAPE DP [STEPS]``.

Shapes: ``160m`` and ``410m`` (Pythia's), ``quick`` (a smoke-test size), ``trained-small``
(small enough to train for a few real steps on a CPU). ``STEPS`` > 0 trains that many steps
first (``exporter.samples.write_checkpoint(train_steps=...)``), else the values are synthetic.
A ``.complete`` stamp lets later runs reuse the folder. Prints one JSON object: the folder,
its size, and the byte size of the largest parameter in fp32.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from exporter.samples import PYTHIA_160M, PYTHIA_410M, ModelShape, parameter_specs, write_checkpoint

SHAPES = {
    "160m": PYTHIA_160M,
    "410m": PYTHIA_410M,
    "quick": ModelShape(num_layers=2, hidden_size=256, num_heads=4, vocab_size=8192,
                        seq_length=128, name="quick"),
    "trained-small": ModelShape(num_layers=2, hidden_size=256, num_heads=4, vocab_size=2048,
                                seq_length=64, name="trained-small"),
}


def main(folder: Path, shape_name: str, dp: int, steps: int) -> dict[str, object]:
    shape = SHAPES[shape_name]
    stamp = folder / ".complete"
    wanted = json.dumps({"shape": shape_name, "dp": dp, "steps": steps, "seed": 0})
    if not (stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(folder, ignore_errors=True)
        write_checkpoint(folder, shape, dp=dp, train_steps=steps)
        stamp.write_text(wanted)
    largest = max(spec.numel for spec in parameter_specs(shape, tp=1, tp_rank=0))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p != stamp)
    return {"folder": str(folder), "bytes": size, "largest_fp32_bytes": largest * 4}


if __name__ == "__main__":
    folder, shape_name, dp = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    print(json.dumps(main(folder, shape_name, dp, steps)))
