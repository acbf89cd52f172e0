"""Statistics throughput: ``StatsAccumulator.update`` now against an earlier version, per dtype.

    python benchmarks/stats.py [--baseline REV] [--chunk-mib 4] [--mib 256] [--pool-mib 8]
                               [--repeats 5] [--dtypes float32,float16,bfloat16] [--threads 1,2]
                               [--values weights,positive]

Each thread summarises ``--mib`` MiB of values in chunks of ``--chunk-mib`` MiB, as the export
does per file-writing thread: ``weights`` (normal, std 0.02: both signs, no zeros),
``positive`` (uniform in [0, 0.01), like Adam's second moments: spread below the mean, so each
sub-block is reduced twice) or ``norm`` (1 + 0.05 x normal, norm weights). The chunks
cycle through a pool of ``--pool-mib`` MiB of its own, so that they come from the cache, as in
the export, where a chunk has just been read and hashed when its statistics are taken;
``--pool-mib 0`` makes every chunk new (from memory). The baseline is ``exporter/convert/stats.py`` at ``--baseline`` (default: the pairwise
two-pass version that the BLAS row sums replaced), loaded from git into a module of its own.
Runs alternate between the two versions, best of ``--repeats``.

Printed per dtype and thread count: GB/s of input per CPU second (the cost that matters: the
export's other threads hash and write meanwhile) and, with several threads, the aggregate GB/s
over wall time; then the ratio new / old per CPU second.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.convert import stats as current  # noqa: E402

# The last version with pairwise add.reduce sums and a float64 two-pass per sub-block.
PAIRWISE = "fa1c63aad24dd54a345970ce9a7b7c71ebe8705c"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int64": torch.int64}


def load_version(rev: str, workdir: Path) -> ModuleType:
    """``exporter/convert/stats.py`` as of git revision ``rev``, imported as a module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:exporter/convert/stats.py"],
                            check=True, capture_output=True, text=True).stdout
    path = workdir / f"stats_{rev[:12]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"stats_{rev[:12]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VALUES = {
    "weights": lambda n, g: torch.randn(n, generator=g) * 0.02,
    "positive": lambda n, g: torch.rand(n, generator=g) * 1e-2,
    "norm": lambda n, g: 1 + 0.05 * torch.randn(n, generator=g),
}


def _chunks(dtype: torch.dtype, values: str, mib: int, pool_mib: int, chunk_mib: float,
            seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    item = torch.empty(0, dtype=dtype).element_size()
    n = (pool_mib or mib) * 2**20 // item
    if dtype.is_floating_point:
        data = VALUES[values](n, g).to(dtype)
    else:
        data = torch.randint(-(2**20), 2**20, (n,), generator=g).to(dtype)
    pool = list(data.split(max(1, int(chunk_mib * 2**20) // item)))
    return pool * (mib // (pool_mib or mib))


def _summarise(module: ModuleType, chunks: list[torch.Tensor], out: dict[str, float]) -> None:
    acc = module.StatsAccumulator()
    start = time.thread_time()
    for chunk in chunks:
        acc.update(chunk)
    out["cpu"] = time.thread_time() - start
    out["mean"] = acc.result().mean


def run_once(module: ModuleType, work: list[list[torch.Tensor]]) -> tuple[float, float]:
    """Summarise each thread's chunks at once; returns (wall seconds, CPU seconds in all)."""
    results: list[dict[str, float]] = [{} for _ in work]
    threads = [threading.Thread(target=_summarise, args=(module, chunks, out))
               for chunks, out in zip(work, results, strict=True)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return wall, sum(r["cpu"] for r in results)


def measure(modules: dict[str, ModuleType], dtype: torch.dtype, values: str, threads: int,
            mib: int, pool_mib: int, chunk_mib: float,
            repeats: int) -> dict[str, dict[str, float]]:
    work = [_chunks(dtype, values, mib, pool_mib, chunk_mib, seed) for seed in range(threads)]
    nbytes = sum(sum(c.numel() * c.element_size() for c in chunks) for chunks in work)
    best: dict[str, dict[str, float]] = {name: {"wall": float("inf"), "cpu": float("inf")}
                                         for name in modules}
    for module in modules.values():  # warm-up: scratch buffers, BLAS initialisation
        run_once(module, [w[:2] for w in work])
    for _ in range(repeats):
        for name, module in modules.items():
            wall, cpu = run_once(module, work)
            best[name]["wall"] = min(best[name]["wall"], wall)
            best[name]["cpu"] = min(best[name]["cpu"], cpu)
    return {name: {"cpu_gb_s": nbytes / b["cpu"] / 1e9, "wall_gb_s": nbytes / b["wall"] / 1e9}
            for name, b in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=PAIRWISE, help="git revision to compare against")
    parser.add_argument("--chunk-mib", type=float, default=4.0, help="the export's chunk size")
    parser.add_argument("--mib", type=int, default=256, help="MiB of input per thread")
    parser.add_argument("--pool-mib", type=int, default=8,
                        help="MiB of distinct data per thread, cycled (0: all distinct)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--values", default="weights,positive", help=", ".join(VALUES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"old": load_version(args.baseline, Path(tmp)), "new": current}
        rows: list[dict[str, Any]] = []
        print(f"baseline {args.baseline[:12]}, chunks of {args.chunk_mib:g} MiB, {args.mib} MiB "
              f"per thread from {args.pool_mib or args.mib} MiB, best of {args.repeats}")
        print(f"{'values':9s} {'dtype':9s} {'threads':>7s}  {'old GB/s/CPU':>12s} "
              f"{'new GB/s/CPU':>12s} {'old GB/s':>9s} {'new GB/s':>9s}  {'new/old':>7s}")
        for values in args.values.split(","):
            for name in args.dtypes.split(","):
                for threads in (int(t) for t in args.threads.split(",")):
                    r = measure(modules, DTYPES[name], values, threads, args.mib, args.pool_mib,
                                args.chunk_mib, args.repeats)
                    ratio = r["new"]["cpu_gb_s"] / r["old"]["cpu_gb_s"]
                    rows.append({"values": values, "dtype": name, "threads": threads, **r,
                                 "ratio": ratio})
                    print(f"{values:9s} {name:9s} {threads:7d}  {r['old']['cpu_gb_s']:12.2f} "
                          f"{r['new']['cpu_gb_s']:12.2f} {r['old']['wall_gb_s']:9.2f} "
                          f"{r['new']['wall_gb_s']:9.2f}  {ratio:6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
