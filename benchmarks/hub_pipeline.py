"""A build from the Hub back to the Hub through a throttled link: is it as fast as the link?

``python benchmarks/hub_pipeline.py`` (Pythia-160M shape, dp=8, 6 steps of 2.2 GB, 15 MB/s
each way) starts the project's test Hub server (``tests/hubserver``), in a process of its own,
with bandwidth limits
(``tests/hubserver/throttle.py``: one shared pipe per direction), seeds a model repository
with one branch per step, each step a distinct synthetic checkpoint written by
``exporter.samples.write_checkpoint`` (deleted once seeded), and times

    neox-export build hf://bench/run --push-to bench/archive --delete-after-push

in this process (the real huggingface_hub client, pipelined local build). It reports the
build's wall time against the link's limit, the larger of bytes downloaded / download rate and
bytes uploaded / upload rate (counted by the server), and against one step's conversion
time; the acceptance target is ``wall <= 1.25 x link limit + one step's conversion``.
``--write`` appends the result to ``benchmarks/RESULTS.md``.

Disk: the server keeps the run and the archive (2 x 13 GB for 160M x 6); the build itself
holds at most ``--max-disk``. ``--shape quick`` runs a small shape in a minute.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from hubserver import HubServer, client_env  # noqa: E402
from sample import SHAPES  # noqa: E402

REPO = "bench/run"
TARGET = "bench/archive"


def seed_run(server: HubServer, shape_name: str, steps: int, dp: int, scratch: Path) -> int:
    """One branch per step, each a distinct checkpoint; returns the bytes seeded."""
    from exporter.samples import write_checkpoint

    total = 0
    for index in range(steps):
        folder = scratch / f"step{index}"
        write_checkpoint(folder, SHAPES[shape_name], step=index * 1000, dp=dp, seed=index)
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        server.seed_repo(REPO, folder, branch=f"step{index * 1000}")
        shutil.rmtree(folder)
        print(f"seeded step {index * 1000}", file=sys.stderr, flush=True)
    return total


def serve(conn: Connection, workdir: Path, shape: str, steps: int, dp: int, rate: float) -> None:
    """The Hub, in a process of its own as it would be on its own machine (its threads must
    not wait for the build's GIL): seed, throttle, serve until told to stop, report bytes."""
    server = HubServer(workdir / "server").start()
    try:
        seeded = seed_run(server, shape, steps, dp, workdir / "scratch")
        server.link.limit(download=rate, upload=rate)
        conn.send((server.endpoint, seeded))
        conn.recv()
        conn.send((server.link.download.bytes, server.link.upload.bytes))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="160m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--rate", type=float, default=15e6,
                        help="bytes per second, each direction (default 15e6)")
    parser.add_argument("--max-disk", type=int, default=None, help="bytes (default: none)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "neox-exporter-hub-bench")
    parser.add_argument("--write", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    hub = multiprocessing.get_context("spawn").Process(target=serve, args=(
        theirs, args.workdir, args.shape, args.steps, args.dp, args.rate))
    hub.start()
    try:
        endpoint, seeded = ours.recv()
        # Before huggingface_hub is imported: it reads its endpoint and settings once.
        os.environ.update(client_env(endpoint, args.workdir / "client"))
        from exporter.hub.source import HubSource
        from exporter.pipeline.run import BuildOptions, build

        start = time.perf_counter()

        def timeline(event: object) -> None:
            print(f"{time.perf_counter() - start:7.1f} s  {event}", file=sys.stderr, flush=True)

        summary = build(HubSource(f"hf://{REPO}", args.workdir / "downloads"),
                        args.workdir / "archive",
                        BuildOptions(quiet=True, push_to=TARGET, delete_after_push=True,
                                     max_disk=args.max_disk, on_push_event=timeline,
                                     on_step_done=lambda step: timeline(f"converted {step}")))
        wall = time.perf_counter() - start
        ours.send("stop")
        down, up = ours.recv()
    finally:
        hub.join(timeout=30)
        if hub.is_alive():
            hub.terminate()
        shutil.rmtree(args.workdir, ignore_errors=True)

    failed = [o for o in summary.outcomes if o.status != "done"]
    if failed:
        raise SystemExit(f"steps failed: {failed}")
    link = max(down / args.rate, up / args.rate)
    convert = statistics.median(o.seconds for o in summary.outcomes)
    target = 1.25 * link + convert
    sequential = down / args.rate + up / args.rate + sum(o.seconds for o in summary.outcomes)
    row = (f"| {datetime.now(UTC):%Y-%m-%d} | {args.shape} x {args.steps} "
           f"({seeded / 1e9:.1f} GB) | {args.rate / 1e6:.0f} | {down / 1e9:.2f} / {up / 1e9:.2f} "
           f"| {link:.0f} | {convert:.1f} | {wall:.0f} | {wall / link:.2f} | {target:.0f} "
           f"| {sequential:.0f} | {'yes' if wall <= target else 'no'} | "
           f"{summary.peak_disk / 1e9:.1f} |")
    print(row)
    if args.write:
        results = HERE / "RESULTS.md"
        text = results.read_text(encoding="utf-8")
        if "## Hub to Hub through a throttled link" not in text:
            text += HEADER.format(machine=f"{os.cpu_count()} cores, {platform.machine()}, "
                                          f"load average {os.getloadavg()[0]:.1f} at the start")
        results.write_text(text + row + "\n", encoding="utf-8")


HEADER = """
## Hub to Hub through a throttled link

`python benchmarks/hub_pipeline.py --write`: `build hf://bench/run --push-to bench/archive
--delete-after-push` against the test Hub server limited to RATE bytes per second each way
({machine}). *Link* is the larger of bytes down / rate and bytes up / rate (as the server
counted them), *convert* one step's conversion (median), *target* 1.25 x link + convert,
*sequential* what fetch, convert and upload one after the other would take (down + up +
every conversion). Times in seconds.

| date | run | MB/s | GB down / up | link | convert | wall | wall / link | target | sequential | within target | peak reserved GB |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


if __name__ == "__main__":
    main()
