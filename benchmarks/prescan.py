"""Seconds the pickle prescan takes on a many-tensor pickle: the numpy fast path, the exact
walker it saves, and ``pickletools.genops`` alone (what any walk in Python costs at least).

    python benchmarks/prescan.py [--tensors 36000] [--repeats 5] [FILE.pt ...]

Without files it writes, in memory, what ``torch.save`` makes of a DeepSpeed-like optimizer
state: a dict of ``tensors / 3`` parameter states, each a dict of three small tensors (the
shape of a ZeRO optimizer file cut into many comm intervals). With files it reads each one's
``data.pkl`` instead. Prints one JSON object per pickle: bytes, opcodes, which path decided,
and the best seconds of ``--repeats`` runs of each.
"""

from __future__ import annotations

import argparse
import io
import json
import pickletools
import zipfile
from pathlib import Path

import torch
from measure import best_of

from exporter.torchfile import prescan
from exporter.torchfile.opscan import proves_safe


def many_tensor_pickle(tensors: int) -> bytes:
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(2),
                 "exp_avg_sq": torch.zeros(2)} for i in range(tensors // 3)}
    groups = [{"lr": 1e-4, "betas": (0.9, 0.95), "params": list(range(tensors // 3))}]
    buf = io.BytesIO()
    torch.save({"optimizer_state_dict": {"state": state, "param_groups": groups}}, buf)
    return _data_pkl(buf.getvalue())


def _data_pkl(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def measure(name: str, data: bytes, repeats: int) -> dict[str, object]:
    def fast() -> bool:
        return proves_safe(data, prescan.MAX_OPCODES, prescan.MAX_DEPTH, prescan.MAX_HASH_WORK)

    def genops() -> None:
        for _ in pickletools.genops(data):
            pass

    return {
        "pickle": name,
        "bytes": len(data),
        "opcodes": sum(1 for _ in pickletools.genops(data)),
        "fast_path_decided": fast(),
        "fast_path_s": round(best_of(fast, repeats), 4),
        "exact_walk_s": round(best_of(lambda: prescan.walk(data), max(1, repeats // 2)), 4),
        "genops_only_s": round(best_of(genops, max(1, repeats // 2)), 4),
        "prescan_s": round(best_of(lambda: prescan.prescan(data), repeats), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--tensors", type=int, default=36_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.files:
        pickles = [(str(f), _data_pkl(f.read_bytes())) for f in args.files]
    else:
        pickles = [(f"torch.save, {args.tensors} tensors", many_tensor_pickle(args.tensors))]
    for name, data in pickles:
        print(json.dumps(measure(name, data, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
