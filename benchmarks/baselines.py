"""The ways of turning a checkpoint into safetensors that ``run.py`` measures the exporter against.

Each runs as a command of its own, so its wall time, CPU time and peak RSS are its alone::

    python benchmarks/baselines.py naive SRC DST
    python benchmarks/baselines.py consolidate SRC DST
    python benchmarks/baselines.py copy-fsync SRC DST
    python benchmarks/baselines.py floor SRC DST

``naive`` is what one writes first: ``torch.load`` each ``.pt`` file whole (a full unpickle,
``weights_only=False`` because the optimizer files pickle DeepSpeed classes; acceptable here only
because the benchmark wrote the files itself) and ``safetensors.torch.save_file`` its tensors.

``consolidate`` is the DeepSpeed way of recovering full optimizer tensors, as
``deepspeed/utils/zero_to_fp32.py`` does for fp32 weights: load every ZeRO partition file at
once, concatenate each param group's sub-partitions, split the flat groups into parameters by
``param_shapes`` and ``torch.save`` the result (master weights and both Adam moments). The
group layout is that of DeeperSpeed eb7f5cff stage 1 elastic checkpoints: sub-partition ``k``
is rank ``k % dp``'s entry for comm interval ``k // dp``, padding trimmed; GPT-NeoX puts norms
and biases in group 1 (``exporter.neox.zero.elastic.is_no_decay``).

``copy-fsync`` is ``cp -r`` followed by an fsync of every copied file, the durability the
exporter gives its own output.

``floor`` is the least any exporter that must see every byte once can do: a copy through user
space that reads each file into one reused buffer (``readinto``), hashes it once with sha256,
writes it and fsyncs it, the files spread over one thread per core (hashlib and file I/O
release the GIL). An export also parses pickles, gathers ZeRO fragments, computes statistics
and a tensor digest, so it costs more; how much more is the figure to watch.

Imports happen inside each command so that ``copy-fsync`` pays for no torch import.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any


def _tensors(value: Any, prefix: str, out: dict[str, Any]) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        # save_file refuses tensors that share storage; own copies, as users end up doing.
        out[prefix or "tensor"] = value.detach().clone(memory_format=torch.contiguous_format)
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensors(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _tensors(item, f"{prefix}.{index}" if prefix else str(index), out)


def naive(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.pt")):
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        tensors: dict[str, Any] = {}
        _tensors(loaded, "", tensors)
        save_file(tensors, str(dst / f"{path.stem}.safetensors"))
        del loaded, tensors


def consolidate(src: Path, dst: Path) -> None:
    import torch

    from exporter.neox.zero.elastic import is_no_decay

    dst.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
    files = sorted((p for p in src.iterdir() if pattern.search(p.name)),
                   key=lambda p: int(pattern.search(p.name)[1]))
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in files]
    shapes: dict[str, Any] = dict(states[0]["param_shapes"])
    groups = [[n for n in shapes if not is_no_decay(n)], [n for n in shapes if is_no_decay(n)]]
    result: dict[str, dict[str, Any]] = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for g, names in enumerate(groups):
        osd = [s["optimizer_state_dict"] for s in states]
        intervals = len(osd[0]["local_sub_partitions_of_fp32_groups"][g])
        flats = {
            "master": torch.cat([o["local_sub_partitions_of_fp32_groups"][g][c]
                                 for c in range(intervals) for o in osd]),
            **{kind: torch.cat([o["base_optimizer_state"][g][c][kind]
                                for c in range(intervals) for o in osd])
               for kind in ("exp_avg", "exp_avg_sq")},
        }
        for kind, flat in flats.items():
            offset = 0
            for name in names:
                numel = shapes[name].numel()
                result[kind][name] = flat.narrow(0, offset, numel).view(shapes[name])
                offset += numel
            if offset != flat.numel():
                raise SystemExit(f"group {g}: {flat.numel()} elements, parameters need {offset}")
    del states
    for kind, tensors in result.items():
        torch.save(tensors, dst / f"{kind}.pt")


def copy_fsync(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    for path in dst.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


FLOOR_BUFFER = 8 << 20


def floor(src: Path, dst: Path) -> None:
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    for path in files:
        (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)

    def copy(path: Path) -> str:
        buffer = bytearray(FLOOR_BUFFER)
        view = memoryview(buffer)
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as fin, \
                open(dst / path.relative_to(src), "wb", buffering=0) as fout:
            while n := fin.readinto(buffer):
                digest.update(view[:n])
                fout.write(view[:n])
            os.fsync(fout.fileno())
        return digest.hexdigest()

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(copy, files))


COMMANDS = {"naive": naive, "consolidate": consolidate, "copy-fsync": copy_fsync,
            "floor": floor}


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: baselines.py {{{','.join(COMMANDS)}}} SRC DST")
    COMMANDS[argv[0]](Path(argv[1]), Path(argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])
