"""GPU benchmark (``make bench-gpu``): casts and statistics on CUDA against the CPU path.

    python benchmarks/gpu.py [--out FILE] [--size-gib 1] [--repeats 3] [--shape 160m|quick]
                             [--skip-e2e] [--device cuda|cpu] [--workdir DIR]

1. End to end: writes the Pythia-160M-shaped sample checkpoint (``sample.py``, dp=8) and runs
   ``neox-export convert`` with ``--device cuda`` and ``--device cpu``, each keeping the model
   dtype and casting to bf16, best of ``--repeats``; the two devices' output files must be
   identical byte for byte.
2. In memory: a ``--size-gib`` fp32 tensor (normal values plus NaN, ±inf and zeros) cast to
   bf16 and float16 with statistics, on the CPU (``StatsAccumulator`` + torch cast, as the CPU
   pipeline does) and on the GPU (``DeviceCastEngine``) fed from pageable memory, from pinned
   memory, and with the data already on the device. Casts must equal the CPU's bit for bit;
   statistics must agree (exact min, max and counts; mean, std and l2 within 1e-6 relative).
   Target: >= 20 GB/s of fp32 input on an H100 / H200.

Prints a table and appends it, with the machine and GPU, to ``--out`` (default
``benchmarks/RESULTS.md``). Takes a few minutes; needs about 8 GB of free disk in ``--workdir``
for the end-to-end part. ``--device cpu`` runs the same code paths without a GPU (the device
engine then works in order on the host), to check the script itself; its numbers mean nothing.
Exit status: 0 when every check passed, 1 when a check failed, 2 when the script could not run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import machine, measure  # noqa: E402

TARGET_GB_S = 20.0
DP = {"160m": 8, "quick": 2}


class BenchError(Exception):
    """The benchmark cannot run here (no GPU, no disk space, a failing command)."""


def _probe(device: str) -> str:
    """The device's name, checked in a child process so that this one stays small."""
    code = ("import torch, sys\n"
            "d = sys.argv[1]\n"
            "if d.startswith('cuda'):\n"
            "    if not torch.cuda.is_available():\n"
            "        print('NO-CUDA'); sys.exit(0)\n"
            "    print(torch.cuda.get_device_name(torch.device(d)))\n"
            "else:\n"
            "    print('cpu (device engine run on the host)')\n")
    out = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"cannot import torch: {out.stderr.strip()[-500:]}")
    name = out.stdout.strip()
    if name == "NO-CUDA":
        raise BenchError("torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu to check the script without a GPU")
    return name


def _tree_digest(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        raise BenchError(f"{folder}: the export wrote no folder")
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(16 << 20):
                    digest.update(block)
            digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def end_to_end(workdir: Path, shape: str, device: str, repeats: int) -> list[dict[str, Any]]:
    """Convert the sample checkpoint on ``device`` and on the CPU; compare the outputs."""
    free = shutil.disk_usage(workdir).free
    if free < 8e9 and shape == "160m":
        raise BenchError(f"{workdir}: {free / 1e9:.1f} GB free, the end-to-end part needs 8 GB")
    dp = DP[shape]
    print(f"sample checkpoint {shape}, dp={dp} ...", flush=True)
    out = subprocess.run([sys.executable, str(HERE / "sample.py"),
                          str(workdir / f"checkpoint-{shape}-dp{dp}"), shape, str(dp)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"writing the sample checkpoint failed: {out.stderr.strip()[-1000:]}")
    sample = json.loads(out.stdout.strip().splitlines()[-1])
    src = Path(sample["folder"])
    cli = Path(sys.executable).parent / "neox-export"
    export = [str(cli)] if cli.exists() else [sys.executable, "-m", "exporter"]
    rows = []
    for dtype in ("keep", "bf16"):
        outputs = {}
        timings: dict[str, list[float]] = {}
        for repeat in range(repeats):
            for dev in dict.fromkeys((device, "cpu")):
                dst = workdir / f"out-{dev.replace(':', '')}-{dtype}"
                shutil.rmtree(dst, ignore_errors=True)
                cmd = [*export, "-q", "convert", str(src), "--out", str(dst), "--device", dev,
                       "--dtype", dtype]
                try:
                    run = measure(cmd)
                except RuntimeError as exc:
                    raise BenchError(str(exc)) from exc
                timings.setdefault(dev, []).append(run.seconds)
                print(f"  [{repeat + 1}/{repeats}] convert --device {dev} --dtype {dtype}: "
                      f"{run.seconds:.2f} s", flush=True)
                if repeat == repeats - 1:
                    outputs[dev] = dst
        digests = {dev: _tree_digest(path) for dev, path in outputs.items()}
        for dev, digest in digests.items():
            # An empty folder on both sides would compare equal: a convert that wrote nothing
            # (a command that exits 0 without running) must fail the check instead.
            if not any(name.endswith(".safetensors") for name in digest):
                raise BenchError(f"convert --device {dev} --dtype {dtype} wrote no safetensors")
        identical = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1
        for dev, seconds in timings.items():
            best = min(seconds)
            rows.append({
                "what": f"convert {shape} --device {dev} --dtype {dtype}",
                "seconds": best,
                "gb_s": sample["bytes"] / best / 1e9,
                "check": "outputs identical across devices" if identical else "OUTPUTS DIFFER",
                "ok": identical,
            })
        for path in outputs.values():
            shutil.rmtree(path, ignore_errors=True)
    return rows


def in_memory(size_gib: float, device: str, repeats: int, chunk_bytes: int) -> list[dict[str, Any]]:
    """Cast + statistics throughput on an in-memory fp32 tensor, CPU against the device."""
    import numpy as np
    import torch

    from exporter.convert.device import DeviceCastEngine, device_moments, merge_moments
    from exporter.convert.engines import CpuCastEngine
    from exporter.convert.stats import StatsAccumulator
    from exporter.dtypes import as_dtype, float32
    from exporter.records import chunks_of

    numel = int(size_gib * 2**30) // 4
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(numel, generator=generator) * 0.02
    source[:: 1 << 20] = float("nan")
    source[1 :: 1 << 21] = float("inf")
    source[2 :: 1 << 21] = float("-inf")
    source[3 :: 1 << 10] = 0.0
    nbytes = numel * 4
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        reference = torch.empty(numel, dtype=dtype)
        cpu_stats = StatsAccumulator()
        cpu_engine = CpuCastEngine()
        start = time.perf_counter()
        pos = 0
        for values, release in cpu_engine.cast(chunks_of(source)(chunk_bytes), float32,
                                               as_dtype(dtype), cpu_stats):
            cpu_stats.update(values, as_dtype(dtype))
            reference[pos : pos + values.size].view(torch.int16).copy_(
                torch.from_numpy(values.view(np.int16)))
            pos += values.size
            if release is not None:
                release()
        cpu_seconds = time.perf_counter() - start
        expected = cpu_stats.result()
        rows.append({"what": f"in memory, CPU: cast to {name} + statistics",
                     "seconds": cpu_seconds, "gb_s": nbytes / cpu_seconds / 1e9,
                     "check": "reference", "ok": True})
        engine = DeviceCastEngine(device, chunk_bytes)
        cuda = engine.cuda
        pinned = source.pin_memory() if cuda else source
        for label, feed in (("pageable", source), ("pinned", pinned)):
            best = math.inf
            for _ in range(repeats):
                stats = StatsAccumulator()
                start = time.perf_counter()
                for _values, release in engine.cast(chunks_of(feed)(chunk_bytes), float32,
                                                    as_dtype(dtype), stats):
                    release()
                best = min(best, time.perf_counter() - start)
            stats = StatsAccumulator()
            pos, equal = 0, True
            for values, release in engine.cast(chunks_of(feed)(chunk_bytes), float32,
                                               as_dtype(dtype), stats):
                want = reference[pos : pos + values.size]
                equal &= torch.equal(torch.from_numpy(values.view(np.int16)), want.view(torch.int16))
                pos += values.size
                release()
            agree = _stats_agree(stats.result(), expected)
            rows.append({
                "what": f"in memory, {device} from {label} host memory: cast to {name} + stats",
                "seconds": best, "gb_s": nbytes / best / 1e9,
                "check": f"cast {'bitwise equal' if equal else 'DIFFERS'}, "
                         f"stats {'agree' if agree else 'DISAGREE'}",
                "ok": equal and agree,
                "target": cuda,
            })
        if cuda:
            resident = source.to(device)
            step = chunk_bytes // 4
            best = math.inf
            for _ in range(repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                moments = [device_moments(resident[i : i + step].to(dtype))
                           for i in range(0, numel, step)]
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            stats = StatsAccumulator()
            for m in moments:
                merge_moments(stats, m.cpu())
            agree = _stats_agree(stats.result(), expected)
            rows.append({"what": f"data resident on {device}: cast to {name} + stats",
                         "seconds": best, "gb_s": nbytes / best / 1e9,
                         "check": f"stats {'agree' if agree else 'DISAGREE'}", "ok": agree})
            del resident
        del pinned, reference
    return rows


def _stats_agree(got: Any, want: Any) -> bool:
    for key in ("min", "max", "nan_count", "inf_count", "zero_count"):
        if getattr(got, key) != getattr(want, key):
            return False
    for key in ("mean", "std", "l2"):
        a, b = getattr(got, key), getattr(want, key)
        if (a is None) != (b is None) or (b is not None and not math.isclose(a, b, rel_tol=1e-6)):
            return False
    return True


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| what | seconds | GB/s of fp32 input | check |", "|---|---:|---:|---|"]
    for r in rows:
        mark = ""
        if r.get("target"):
            mark = " (target met)" if r["gb_s"] >= TARGET_GB_S else f" (below {TARGET_GB_S:.0f})"
        lines.append(f"| {r['what']} | {r['seconds']:.3f} | {r['gb_s']:.2f}{mark} | {r['check']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU cast + statistics benchmark.")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md",
                        help="results file to append to")
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(DP), default="160m")
    parser.add_argument("--skip-e2e", action="store_true", help="in-memory part only")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "neox-exporter-bench")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        gpu = _probe(args.device)
        print(f"device: {gpu}", flush=True)
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        if not args.skip_e2e:
            rows += end_to_end(args.workdir, args.shape, args.device, args.repeats)
        print("in-memory cast + statistics ...", flush=True)
        rows += in_memory(args.size_gib, args.device, args.repeats, args.chunk_mib << 20)
    except BenchError as exc:
        print(f"gpu.py: error: {exc}", file=sys.stderr)
        return 2
    info = machine()
    header = (f"## GPU benchmark, {info['date']}\n\nDevice: {gpu}; host: {info['cpu']}, "
              f"{info['memory']} RAM; torch {info['torch']}. Command: `python benchmarks/gpu.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}`; "
              f"{time.perf_counter() - started:.0f} s in all.\n")
    text = header + "\n" + _table(rows) + "\n"
    print(text)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write("\n" + text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
