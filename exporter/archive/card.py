"""The dataset card (``README.md``) of an archive, generated from its manifest and index.

The YAML front matter declares two ``configs`` over the Parquet index, so
``datasets.load_dataset(REPO, "tensors")`` and the Hub's dataset viewer read it (the
``configs`` field of the Hub's dataset card metadata: one ``config_name`` with its
``data_files`` per table). The body says where the checkpoints came from, what was converted,
how big it is, how to load it, and shows a per-step statistic from the index. The text
depends only on the archive and the repository name, so regenerating an unchanged card
yields the same bytes and publishing it again makes no commit.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from exporter.archive.index import read_index
from exporter.archive.layout import manifest_path, write_bytes_atomic
from exporter.errors import ArchiveError

TAGS = ["gpt-neox", "pythia", "checkpoints", "safetensors", "training-dynamics"]
PLOT_FILE = "assets/attention_dense_l2.png"
PLOT_STAT = "l2"
PLOT_MATCH = "layers.*.attention.dense.weight"
#: a longer steps table shows its first and last rows only
STEPS_SHOWN = 40


def card_metadata(license: str, pretty_name: str) -> dict[str, Any]:
    """The YAML front matter: license, tags and one config per index table."""
    return {
        "license": license,
        "pretty_name": pretty_name,
        "tags": list(TAGS),
        "configs": [
            {"config_name": "tensors", "default": True,
             "data_files": [{"split": "train", "path": "index/tensors/*.parquet"}]},
            {"config_name": "checkpoints",
             "data_files": [{"split": "train", "path": "index/checkpoints/*.parquet"}]},
        ],
    }


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _source_link(source: str) -> str:
    if source.startswith("hf://"):
        repo = source.removeprefix("hf://")
        return f"[{repo}](https://huggingface.co/{repo})"
    return f"`{source}`"


def _steps_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| step | source revision | tensors | size | learning rate | loss scale |",
             "|---:|---|---:|---:|---:|---:|"]
    shown = rows if len(rows) <= STEPS_SHOWN else rows[:STEPS_SHOWN // 2] + [None] + rows[-STEPS_SHOWN // 2:]
    for row in shown:
        if row is None:
            lines.append(f"| … | {len(rows) - STEPS_SHOWN} more steps | | | | |")
            continue
        revision = f"`{row['source_revision']}`" if row["source_revision"] else "–"
        lines.append(f"| {row['step']} | {revision} | {row['tensors']} | {_size(row['bytes_out'])} "
                     f"| {_cell(row['learning_rate'])} | {_cell(row['loss_scale'])} |")
    return lines


#: what each file of a step folder holds (exporter.export)
STEP_FILES = {
    "config.json": "transformers GPTNeoXConfig",
    "model.safetensors": "model weights, Hugging Face names",
    "model.safetensors.index.json": "which shard holds each model weight",
    "buffers.safetensors": "persistent buffers (rotary inv_freq)",
    "optimizer/master.safetensors": "fp32 master weights (ZeRO partitions merged)",
    "optimizer/exp_avg.safetensors": "Adam first moments",
    "optimizer/exp_avg_sq.safetensors": "Adam second moments",
    "state.json": "engine and optimizer state (iteration, lr, loss scale ...)",
    "state.safetensors": "tensor-valued engine state (rng states)",
    "neox.yml": "the GPT-NeoX config",
}
INDEX_FILES = [
    ("manifest.json", "format version, source, options, completed steps"),
    ("index/tensors/step{N}.parquet", "one row per tensor: names, dtype, shape, file, offsets,"),
    ("", "digest (BLAKE3), min/max/mean/std/l2/absmax, nan/inf/zero counts"),
    ("index/checkpoints/step{N}.parquet", "one row per step: iteration, lr, loss scale,"),
    ("", "parallelism, source and output files with sha256"),
]


def _layout(output_files: list[dict[str, Any]], step: int) -> list[str]:
    prefix = f"steps/step{step}/"
    entries = list(INDEX_FILES)
    for entry in output_files:
        relative = entry["path"].removeprefix(prefix)
        what = STEP_FILES.get(relative, "model weights shard" if relative.startswith("model") else "")
        entries.append((f"steps/step{{N}}/{relative}", what))
    width = max(len(path) for path, _ in entries) + 2
    return [f"{path:<{width}}{what}".rstrip() for path, what in entries]


def _example_name(tensors: pa.Table, step: int) -> str:
    from exporter.archive.plot import name_matches

    names = tensors.filter(pc.and_(pc.equal(tensors["step"], step),
                                   pc.equal(tensors["kind"], "model")))["name"].to_pylist()
    for name in names:
        if name_matches(name, PLOT_MATCH):
            return name
    return names[0] if names else "gpt_neox.embed_in.weight"


def _kinds(tensors: pa.Table, step: int) -> str:
    counts = Counter(tensors.filter(pc.equal(tensors["step"], step))["kind"].to_pylist())
    return ", ".join(f"{kind} {n}" for kind, n in counts.items())


def card_text(root: str | Path, repo_id: str, *, license: str = "apache-2.0",
              plot_file: str | None = PLOT_FILE) -> str:
    """The card of the archive at ``root`` as published under ``repo_id``.

    Args:
        root: the archive folder.
        repo_id: ``ORG/NAME`` of the dataset repository (used in the loading snippets).
        license: license identifier for the front matter.
        plot_file: path of the plot image relative to the root, or None for no plot.
    """
    root = Path(root)
    manifest = json.loads(manifest_path(root).read_text(encoding="utf-8"))
    steps = sorted(int(s) for s in manifest.get("steps", {}))
    if not steps:
        raise ArchiveError(f"{root}: the archive has no completed steps")
    wanted = pa.array(steps, pa.int64())
    checkpoints = read_index(root / "index" / "checkpoints")
    checkpoints = checkpoints.filter(pc.is_in(checkpoints["step"], wanted)).sort_by("step")
    tensors = read_index(root / "index" / "tensors")
    tensors = tensors.filter(pc.is_in(tensors["step"], wanted))
    rows = checkpoints.to_pylist()
    if not rows:
        raise ArchiveError(f"{root}: no checkpoint index for steps {steps}")
    last, first = rows[-1], rows[0]
    step = last["step"]
    include = manifest["options"]["include"]
    total = sum(r["bytes_out"] for r in rows)
    files = sum(len(r["output_files"]) for r in rows)
    revisions = [r["source_revision"] for r in rows if r["source_revision"]]
    name = repo_id.split("/")[-1]
    model_file = next((f["path"] for f in last["output_files"]
                       if f["path"].startswith(f"steps/step{step}/model")
                       and f["path"].endswith(".safetensors")), None)
    example = _example_name(tensors, step)

    out = ["---", yaml.safe_dump(card_metadata(license, f"{name} training checkpoints"),
                                 sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    out += [f"Training checkpoints of a GPT-NeoX model, {len(steps)} steps from step {steps[0]} "
            f"to step {steps[-1]}, converted from the raw DeepSpeed checkpoint files of "
            f"{_source_link(manifest['source'])} into a pickle-free archive: tensors in "
            "safetensors files, a Parquet index with one row per tensor (with statistics) and "
            "one row per step, and the engine state as JSON. Nothing here needs `pickle` to load.",
            "", "## Source", "",
            f"- Repository: {_source_link(manifest['source'])}",
            f"- Steps: {len(steps)} ({', '.join(map(str, steps[:8]))}"
            f"{', …' if len(steps) > 8 else ''})"]
    if revisions:
        out.append(f"- Revisions: one commit per step, listed below ({len(revisions)} of "
                   f"{len(rows)} steps record their source commit hash)")
    out += [f"- Parallelism: data {_cell(first['dp_size'])}, tensor {_cell(first['tp_size'])}, "
            f"pipeline {_cell(first['pp_size'])}; optimizer checkpoint format: {first['format']}",
            "", "## What was converted", "",
            "| | |", "|---|---|",
            f"| included | {', '.join(include)} |",
            f"| model dtype | {first['model_dtype']} → {first['output_dtype']} (stored) |",
            "| optimizer | fp32 master weights and Adam moments, merged from the ZeRO "
            "partitions, under the model's parameter names |"
            if "optimizer" in include else "| optimizer | not included |",
            f"| tensors per step | {last['tensors']} ({_kinds(tensors, step)}) |",
            f"| tool | neox-exporter {manifest['tool']['version']} |",
            "", "## Size", "",
            f"{_size(total)} in {files} files over {len(steps)} steps ({_size(total / len(steps))} "
            f"per step), converted from {_size(sum(r['bytes_in'] for r in rows))} of tensor data "
            "in the source files.", "", "## Steps", ""]
    out += _steps_table(rows)
    out += ["", "Every column of every step: "
            f"`load_dataset(\"{repo_id}\", \"checkpoints\", split=\"train\")`.", "",
            "## Layout", "", "```"]
    out += _layout(last["output_files"], step)
    out += ["```", "",
            "## Loading", "",
            "Tensors, memory-mapped, with [neox-exporter](https://pypi.org/project/neox-exporter/):",
            "", "```python", "from exporter import open_archive", "",
            f"archive = open_archive(\"hf://datasets/{repo_id}\")",
            f"w = archive.tensor({step}, \"{example}\")",
            f"weights = archive.state_dict({step})          # every model tensor of the step",
            f"state = archive.state({step})                 # iteration, lr, rng states ...",
            "```", ""]
    if model_file is not None:
        out += ["One file with `safetensors` alone:", "", "```python",
                "from huggingface_hub import hf_hub_download",
                "from safetensors.torch import load_file", "",
                f"path = hf_hub_download(\"{repo_id}\", \"{model_file}\", repo_type=\"dataset\")",
                "weights = load_file(path)", "```", "",
                "A step as a `transformers` model:", "", "```python",
                "from transformers import GPTNeoXForCausalLM", "",
                f"model = GPTNeoXForCausalLM.from_pretrained(archive.model_path({step}))",
                "```", ""]
    out += ["The index, with `datasets`:", "", "```python", "from datasets import load_dataset", "",
            f"tensors = load_dataset(\"{repo_id}\", \"tensors\", split=\"train\")",
            f"checkpoints = load_dataset(\"{repo_id}\", \"checkpoints\", split=\"train\")",
            "```", ""]
    if plot_file is not None:
        out += ["## Training dynamics", "",
                f"![{PLOT_STAT} norm of each layer's attention.dense.weight per step]({plot_file})",
                "", f"Drawn from the index with `neox-export plot hf://datasets/{repo_id} "
                f"--stat {PLOT_STAT} --match '{PLOT_MATCH}' --out plot.png`.", ""]
    return "\n".join(out)


def write_card(root: str | Path, repo_id: str, *, license: str = "apache-2.0") -> list[str]:
    """Write ``README.md`` (and its plot, when the index has tensors to draw) into the archive.

    Returns:
        The paths written, relative to the root.
    """
    from exporter.archive.plot import plot_statistic

    root = Path(root)
    written = []
    plot_file: str | None = PLOT_FILE
    try:
        plot_statistic(read_index(root / "index" / "tensors"), stat=PLOT_STAT, match=PLOT_MATCH,
                       out=root / PLOT_FILE,
                       title=f"{PLOT_STAT} norm of attention.dense.weight, by layer")
        written.append(PLOT_FILE)
    except ArchiveError:
        plot_file = None  # no model tensors were exported: a card without the plot
    text = card_text(root, repo_id, license=license, plot_file=plot_file)
    write_bytes_atomic(root / "README.md", text.encode("utf-8"))
    return ["README.md", *written]
