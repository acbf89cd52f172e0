"""Reading one tensor across every step of a published archive: byte ranges vs whole files.

    python benchmarks/hub_reads.py [--shape 160m|tiny] [--steps 6] [--kind model|exp_avg]
                                   [--repeats 3] [--workdir DIR] [--write]

Writes a synthetic Pythia-shaped run (``exporter.samples.write_checkpoint``, one seed per
step so no two steps share bytes), builds its archive (model weights; with ``--kind exp_avg``
the optimizer state too, and the tensor read is that Adam moment), seeds it into the
Hub test server (``tests/hubserver``) on 127.0.0.1 and reads one layer's tensor
(``gpt_neox.layers.5.attention.dense.weight``; layer 1 for ``tiny``) at every step three ways,
each in a child process with a cold Hugging Face cache of its own, through the real
huggingface_hub client:

- ``range``: ``open_archive("hf://datasets/...").trajectory(name)``: the manifest, the
  index and one byte range per step;
- ``range, second read``: the same again in a new process with the caches of the first;
- ``whole files``: ``archive.download(kinds=[kind])`` then the same trajectory, which is
  what reading cost before range reads (each step's file of that kind downloaded whole).

The server counts the bytes of file content it sends; seconds are the best of ``--repeats``
(each from cold caches), from opening the archive to the last tensor. ``--write`` appends the table to
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hubserver import HubServer, client_env  # noqa: E402

REPO = "bench/hub-reads"

CHILD = f"""
import json, sys, time
from exporter import open_archive
method, name, cache, kind = sys.argv[1:5]
start = time.perf_counter()
archive = open_archive("hf://datasets/{REPO}", cache_dir=cache)
if method == "whole":
    archive.download(kinds=[kind])
total = sum(t.numel() * t.element_size() for _, t in archive.trajectory(name, kind))
print(json.dumps({{"seconds": time.perf_counter() - start, "tensor_bytes": total}}))
"""


def build_archive(shape_name: str, steps: list[int], workdir: Path, kind: str) -> Path:
    from exporter.pipeline.export import ExportOptions
    from exporter.pipeline.run import BuildOptions, build
    from exporter.samples import PYTHIA_160M, TINY, write_checkpoint
    from exporter.sources import LocalSource

    shape = {"160m": PYTHIA_160M, "tiny": TINY}[shape_name]
    include = ("model",) if kind == "model" else ("model", "optimizer")
    out = workdir / f"archive-{shape_name}-{len(steps)}-{'-'.join(include)}"
    if (out / "manifest.json").exists():
        return out
    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)
    for step in steps:
        write_checkpoint(run / f"step{step}", shape, step=step, dp=1, seed=step + 1)
    build(LocalSource(run), out, BuildOptions(quiet=True, export=ExportOptions(include=include)))
    shutil.rmtree(run)
    return out


def measure(server: HubServer, method: str, name: str, kind: str, home: Path,
            cache: Path) -> dict[str, float]:
    env = {**os.environ, **client_env(server.endpoint, home), "PYTHONPATH": str(ROOT)}
    server.clear_requests()
    done = subprocess.run([sys.executable, "-c", CHILD, method, name, str(cache), kind], env=env,
                          check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    files = r"/resolve/[0-9a-f]{40}/steps/"
    return {**result, "bytes_sent": server.bytes_sent("GET", r"/resolve/"),
            "tensor_file_bytes": server.bytes_sent("GET", files),
            "requests": server.count_requests(), "file_requests": server.count_requests("GET", files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="160m", choices=["160m", "tiny"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "neox-exporter-bench")
    parser.add_argument("--kind", default="model", choices=["model", "exp_avg"])
    parser.add_argument("--repeats", type=int, default=3, help="best of N (seconds)")
    parser.add_argument("--write", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    steps = [0, *range(1000, 1000 * args.steps, 1000)]
    name = f"gpt_neox.layers.{5 if args.shape == '160m' else 1}.attention.dense.weight"
    archive = build_archive(args.shape, steps, args.workdir, args.kind)
    archive_bytes = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
    index_bytes = sum(p.stat().st_size for p in [archive / "manifest.json",
                                                  *(archive / "index").rglob("*.parquet")])
    scratch = Path(tempfile.mkdtemp(prefix="hub-reads-", dir=args.workdir))
    rows: dict[str, dict[str, float]] = {}
    with HubServer(scratch / "server") as server:
        server.seed_repo(REPO, archive, repo_type="dataset", message="Add steps")
        for repeat in range(args.repeats):  # best of N seconds; every repeat starts cold
            cache = scratch / f"tensor-cache-{repeat}"
            for label, method, home in (("range", "range", "a"),
                                        ("range, second read", "range", "a"),
                                        ("whole files", "whole", "c")):
                result = measure(server, method, name, args.kind, scratch / f"{home}{repeat}",
                                 cache if method == "range" else scratch / f"unused-{repeat}")
                print(label, json.dumps(result), flush=True)
                best = rows.get(label)
                if best is None or result["seconds"] < best["seconds"]:
                    rows[label] = result
                shutil.rmtree(scratch / f"c{repeat}", ignore_errors=True)
    shutil.rmtree(scratch)
    tensor = rows["range"]["tensor_bytes"]
    lines = [
        f"\n## Reading one tensor across steps from the Hub ({time.strftime('%Y-%m-%d')})\n",
        f"`python benchmarks/hub_reads.py --shape {args.shape} --steps {len(steps)} "
        f"--kind {args.kind}`: `{name}` ({args.kind}) at {len(steps)} steps of a synthetic "
        f"{'Pythia-160M' if args.shape == '160m' else 'tiny'}-shaped archive "
        f"({archive_bytes / 1e6:.0f} MB; index and manifest {index_bytes / 1e3:.0f} kB), "
        f"from the Hub test server on 127.0.0.1 through huggingface_hub "
        f"{__import__('huggingface_hub').__version__}, each read in a fresh process with a "
        f"cold Hugging Face cache; best of {args.repeats}. The tensor is {tensor / len(steps) / 1e6:.2f} MB per step, "
        f"{tensor / 1e6:.2f} MB in all.\n",
        "| method | bytes sent | of which tensor files | file requests | all requests | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['bytes_sent'] / 1e6:.2f} MB | {r['tensor_file_bytes'] / 1e6:.2f} MB "
                     f"| {r['file_requests']} | {r['requests']} | {r['seconds']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
