"""Compression ratio and speed of byte-shuffled zstd on the files an export writes.

    python benchmarks/compression.py CHECKPOINT WORKDIR [--quick]

Exports CHECKPOINT (model + optimizer), compresses the model weights, master weights and both
Adam moments with ``exporter.convert.compress`` at zstd levels 1 and 3 and reads every tensor
back; does the same for a
small model trained for a few real steps (``sample.py``: 16 steps of ``trained-small``, or 2 steps
of ``quick`` with ``--quick``), whose Adam moments have the spread real ones have. Prints the
rows as JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard
from sample import main as write_sample

from exporter.convert.compress import (
    compress_safetensors,
    read_compressed_index,
    read_compressed_tensor,
)
from exporter.pipeline.export import ExportOptions, export_checkpoint

SAMPLE_BYTES = 64 << 20  # plain zstd, for comparison, on the start of each file
LEVELS = (1, 3)


@dataclass(frozen=True)
class CompressionRow:
    """One file compressed at one level."""

    data: str
    file: str
    level: int
    raw_bytes: int
    ratio: float
    plain_ratio: float
    compress_mb_s: float
    decompress_mb_s: float


def measure_file(data: str, path: Path, scratch: Path, level: int) -> CompressionRow:
    """Compress ``path`` into ``scratch``, read every tensor back, compare with plain zstd."""
    target = scratch / f"{path.name}.zst"
    report = compress_safetensors(path, target, level)
    start = time.perf_counter()
    names = [n for n in read_compressed_index(target) if not n.startswith("__")]
    for name in names:
        read_compressed_tensor(target, name)
    decompress = time.perf_counter() - start
    with open(path, "rb") as fh:
        sample = fh.read(SAMPLE_BYTES)
    plain = len(zstandard.ZstdCompressor(level=level).compress(sample)) / max(1, len(sample))
    target.unlink()
    mb = report.raw_bytes / 1e6
    return CompressionRow(
        data=data,
        file=path.name,
        level=level,
        raw_bytes=report.raw_bytes,
        ratio=report.ratio,
        plain_ratio=plain,
        compress_mb_s=mb / report.seconds if report.seconds else 0.0,
        decompress_mb_s=mb / decompress if decompress else 0.0,
    )


def export_files(step_dir: Path) -> list[Path]:
    """Model weights, master weights and both Adam moments of an exported step folder."""
    model = sorted(step_dir.glob("model*.safetensors"))
    optimizer = [step_dir / "optimizer" / f"{k}.safetensors" for k in ("master", "exp_avg", "exp_avg_sq")]
    return [*model, *(p for p in optimizer if p.exists())]


def run(src: Path, workdir: Path, quick: bool) -> list[CompressionRow]:
    scratch = workdir / "compression"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shape, steps = ("quick", 2) if quick else ("trained-small", 16)
    trained_src = workdir / f"trained-{shape}-{steps}"
    write_sample(trained_src, shape, 2, steps)
    rows = []
    for label, checkpoint in ((f"synthetic {src.name}", src),
                              (f"trained {shape}, {steps} steps", trained_src)):
        exported = scratch / "export"
        export_checkpoint(checkpoint, exported, ExportOptions(include=("model", "optimizer")))
        rows += [measure_file(label, path, scratch, level)
                 for path in export_files(exported) for level in LEVELS]
        shutil.rmtree(exported)
    shutil.rmtree(scratch)
    return rows


if __name__ == "__main__":
    found = run(Path(sys.argv[1]), Path(sys.argv[2]), "--quick" in sys.argv[3:])
    print(json.dumps([asdict(r) for r in found]))
