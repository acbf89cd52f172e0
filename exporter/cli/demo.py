"""``make demo``: the main job end to end on an embedded sample run.

1. writes a tiny GPT-NeoX run in the Pythia-era layout (a few real training steps; fp16
   layer files, DeeperSpeed elastic ZeRO-1 partitions, engine state, YAML config);
2. ``inspect``s one checkpoint without executing any pickle;
3. ``build``s the archive (safetensors + Parquet index + manifest), then re-runs it to show
   that complete steps are skipped;
4. ``verify``s the archive; 5. loads tensors back by memory-mapping.

Run: ``python -m exporter.cli.demo --out demo-out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from exporter.cli.main import main as cli_main


def _run(args: list[str]) -> None:
    print(f"\n$ neox-export {' '.join(args)}", flush=True)
    try:
        cli_main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    run, archive = out / "run", out / "archive"

    from exporter.samples import TINY, tiny_run_config, write_run

    steps = (0, 1, 2, 4, 8)
    print(f"writing a tiny Pythia-era run ({len(steps)} checkpoints) to {run}")
    write_run(run, TINY, steps=steps, dp=2, config=tiny_run_config(steps[-1]))
    _run(["inspect", str(run / "step8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
    _run(["build", str(run), "--out", str(archive)])
    _run(["build", str(run), "--out", str(archive)])
    _run(["verify", str(archive)])

    from exporter import open_archive

    arc = open_archive(archive)
    name = "gpt_neox.layers.0.attention.dense.weight"
    print(f"\n>>> archive = open_archive({str(archive)!r})")
    print(f">>> archive.steps\n{arc.steps}")
    for kind in ("model", "master", "exp_avg_sq"):
        t = arc.tensor(8, name, kind=kind)
        print(f">>> archive.tensor(8, {name!r}, kind={kind!r})  # {t.dtype}, {tuple(t.shape)}, "
              f"l2 {t.float().norm():.4f}")
    rows = arc.checkpoints.select(["step", "iteration", "skipped_steps", "loss_scale",
                                   "adam_step"]).to_pylist()
    print(">>> archive.checkpoints (step, iteration, skipped, loss scale, adam step)")
    for r in rows:
        print(f"    {r['step']:>4} {r['iteration']:>4} {r['skipped_steps']:>3} "
              f"{r['loss_scale']:>10} {r['adam_step']:>4}")
    print(f"\ndemo done: archive at {archive} ({arc.index.count_rows()} tensors indexed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
