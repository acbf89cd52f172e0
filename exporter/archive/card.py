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
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from exporter.archive.index import read_index
from exporter.archive.layout import (
    CARD,
    CARD_PLOT,
    CHECKPOINT_INDEX_DIR,
    MANIFEST,
    STEP_FILES,
    TENSOR_INDEX_DIR,
    card_path,
    checkpoint_index_file,
    index_glob,
    step_file,
    step_prefix,
    tensor_index_file,
)
from exporter.archive.text import markdown_code, markdown_text, terminal_text
from exporter.archive.trust import read_json, resolve_inside
from exporter.archive.validate import validate_manifest
from exporter.errors import ArchiveError
from exporter.files import write_bytes_atomic

TAGS = ["gpt-neox", "pythia", "checkpoints", "safetensors", "training-dynamics"]
PLOT_STAT = "l2"
PLOT_MATCH = "layers.*.attention.dense.weight"
#: a longer steps table shows its first and last rows only
STEPS_SHOWN = 40


#: The Hub's dataset ``size_categories`` (number of rows of the default config), smallest
#: first, with their upper bounds (huggingface_hub ``repocard_data.DatasetCardData`` /
#: hub-docs ``datasetcard.md`` metadata: n<1K, 1K<n<10K ... n>1T).
SIZE_CATEGORIES = (
    (10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"), (10**12, "100B<n<1T"),
)

#: Cited when the source is a Pythia run (EleutherAI/pythia README, "Citation Details").
PYTHIA_CITATION = """@inproceedings{biderman2023pythia,
  title={Pythia: A Suite for Analyzing Large Language Models Across Training and Scaling},
  author={Biderman, Stella and Schoelkopf, Hailey and Anthony, Quentin Gregory and Bradley, Herbie and O'Brien, Kyle and Hallahan, Eric and Khan, Mohammad Aflah and Purohit, Shivanshu and Prashanth, USVSN Sai and Raff, Edward and others},
  booktitle={International Conference on Machine Learning},
  pages={2397--2430},
  year={2023},
  organization={PMLR}
}"""


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` value for a table of ``rows`` rows."""
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def hub_url(path: str) -> str:
    """``path`` on the Hub the client talks to (``HF_ENDPOINT``; huggingface.co by default)."""
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{path}"


def card_metadata(license: str, pretty_name: str, rows: int = 0) -> dict[str, Any]:
    """The YAML front matter: license, size category, tags and one config per index table."""
    return {
        "license": license,
        "pretty_name": pretty_name,
        "size_categories": [size_category(rows)],
        "tags": list(TAGS),
        "configs": [
            {"config_name": "tensors", "default": True,
             "data_files": [{"split": "train", "path": index_glob(TENSOR_INDEX_DIR)}]},
            {"config_name": "checkpoints",
             "data_files": [{"split": "train", "path": index_glob(CHECKPOINT_INDEX_DIR)}]},
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
    return markdown_text(value)


def _source_link(source: str) -> str:
    if source.startswith("hf://"):
        repo, _, revision = source.removeprefix("hf://").strip("/").partition("@")
        page = repo if not revision else f"{repo}/tree/{revision}"
        label = markdown_text(source.removeprefix("hf://"))
        return f"[{label}]({hub_url(quote(terminal_text(page)))})"
    return markdown_code(source)


def _verbatim(text: str) -> str:
    """Archive text inside a fenced code block: control characters escaped, and no backtick
    that could close the fence."""
    return terminal_text(text).replace("`", "'")


def _citation(name: str, repo_id: str, source: str, version: str) -> list[str]:
    key = "".join(c if c.isalnum() else "_" for c in name.lower())
    out = ["## Citation", "",
           "Cite the paper of the model these checkpoints come from, and this conversion:", "", "```bibtex",
           f"@misc{{{key}_checkpoints,",
           f"  title = {{{{{name}}}: training checkpoints in safetensors and Parquet}},",
           f"  howpublished = {{\\url{{{hub_url('datasets/' + repo_id)}}}}},",
           f"  note = {{Converted from {_verbatim(source.removeprefix('hf://'))} with "
           f"neox-exporter {_verbatim(version)}}}",
           "}", "```", ""]
    if "pythia" in source.lower():
        out[2] = "The model (Pythia):"
        out[3:3] = ["", "```bibtex", PYTHIA_CITATION, "```", "", "This conversion:"]
    return out


def _steps_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| step | source revision | tensors | size | learning rate | loss scale |",
             "|---:|---|---:|---:|---:|---:|"]
    shown = rows if len(rows) <= STEPS_SHOWN else rows[:STEPS_SHOWN // 2] + [None] + rows[-STEPS_SHOWN // 2:]
    for row in shown:
        if row is None:
            lines.append(f"| … | {len(rows) - STEPS_SHOWN} more steps | | | | |")
            continue
        revision = (markdown_code(row["source_revision"], in_table=True)
                    if row["source_revision"] else "–")
        lines.append(f"| {row['step']} | {revision} | {row['tensors']} | {_size(row['bytes_out'])} "
                     f"| {_cell(row['learning_rate'])} | {_cell(row['loss_scale'])} |")
    return lines


INDEX_FILES = [
    (MANIFEST, "format version, source, options, completed steps"),
    (tensor_index_file("{N}"), "one row per tensor: names, dtype, shape, file, offsets,"),
    ("", "digest (BLAKE3), min/max/mean/std/l2/absmax, nan/inf/zero counts"),
    (checkpoint_index_file("{N}"), "one row per step: iteration, lr, loss scale,"),
    ("", "parallelism, source and output files with sha256"),
]


def _layout(output_files: list[dict[str, Any]], step: int) -> list[str]:
    prefix = step_prefix(step) + "/"
    entries = list(INDEX_FILES)
    for entry in output_files:
        relative = entry["path"].removeprefix(prefix)
        what = STEP_FILES.get(relative, "model weights shard" if relative.startswith("model") else "")
        entries.append((step_file("{N}", relative), what))
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


def card_text(root: str | Path, repo_id: str, *, license: str = "unknown",
              plot_file: str | None = CARD_PLOT, model_repo: str | None = None) -> str:
    """The card of the archive at ``root`` as published under ``repo_id``.

    Args:
        root: the archive folder.
        repo_id: ``ORG/NAME`` of the dataset repository (used in the loading snippets).
        license: license identifier for the front matter.
        plot_file: path of the plot image relative to the root, or None for no plot.
        model_repo: ``ORG/NAME`` of the run's model repository (one branch per step), if any.
    """
    root = Path(root)
    label = f"{root}/{MANIFEST}"
    manifest = validate_manifest(read_json(resolve_inside(root, MANIFEST, str(root)), label),
                                 label)
    steps = sorted(int(s) for s in manifest.get("steps", {}))
    if not steps:
        raise ArchiveError(f"{root}: the archive has no completed steps")
    wanted = pa.array(steps, pa.int64())
    checkpoints = read_index(root / CHECKPOINT_INDEX_DIR)
    checkpoints = checkpoints.filter(pc.is_in(checkpoints["step"], wanted)).sort_by("step")
    tensors = read_index(root / TENSOR_INDEX_DIR)
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
                       if f["path"].startswith(step_file(step, "model"))
                       and f["path"].endswith(".safetensors")), None)
    example = _example_name(tensors, step)

    out = ["---", yaml.safe_dump(card_metadata(license, f"{name} training checkpoints",
                                               tensors.num_rows),
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
            f"pipeline {_cell(first['pp_size'])}; optimizer checkpoint format: "
            f"{markdown_text(first['format'])}",
            "", "## What was converted", "",
            "| | |", "|---|---|",
            f"| included | {', '.join(include)} |",
            f"| model dtype | {markdown_text(first['model_dtype'])} → "
            f"{markdown_text(first['output_dtype'])} (stored) |",
            "| optimizer | fp32 master weights and Adam moments, merged from the ZeRO "
            "partitions, under the model's parameter names |"
            if "optimizer" in include else "| optimizer | not included |",
            f"| tensors per step | {last['tensors']} ({_kinds(tensors, step)}) |",
            f"| tool | neox-exporter {markdown_text(manifest['tool']['version'])} |",
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
            f"w = archive.tensor({step}, {json.dumps(example)})   # only this tensor's bytes",
            f"weights = archive.state_dict({step})          # every model tensor of the step",
            f"state = archive.state({step})                 # iteration, lr, rng states ...",
            f"for step, t in archive.trajectory({json.dumps(example)}):   # one tensor, every step",
            "    ...",
            "l2 = archive.stats(\"layers.*.attention.dense.weight\", stat=\"l2\")  # index only",
            "```", "",
            "The index is plain Parquet; with DuckDB or pandas (through `huggingface_hub`'s "
            "`hf://` file system):", "", "```python", "import duckdb", "",
            "duckdb.sql(\"SELECT step, name, l2 FROM "
            f"'hf://datasets/{repo_id}/{index_glob(TENSOR_INDEX_DIR)}' "
            "WHERE kind = 'model' AND name LIKE '%attention.dense.weight'\").df()",
            "```", ""]
    if model_repo is not None:
        out += ["## Model repository", "",
                f"Every step as a `transformers` model, one branch per step as in EleutherAI's "
                f"Pythia repositories: [{model_repo}](https://huggingface.co/{model_repo}).", "",
                "```python", "from transformers import GPTNeoXForCausalLM", "",
                f"model = GPTNeoXForCausalLM.from_pretrained(\"{model_repo}\", "
                f"revision=\"step{step}\")", "```", ""]
    if model_file is not None:
        out += ["One file with `safetensors` alone:", "", "```python",
                "from huggingface_hub import hf_hub_download",
                "from safetensors.torch import load_file", "",
                f"path = hf_hub_download(\"{repo_id}\", {json.dumps(model_file)}, repo_type=\"dataset\")",
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
    out += _citation(name, repo_id, manifest["source"], manifest["tool"]["version"])
    return "\n".join(out)


def write_card(root: str | Path, repo_id: str, *, license: str = "unknown",
               model_repo: str | None = None) -> list[str]:
    """Write ``README.md`` (and its plot, when the index has tensors to draw) into the archive.

    Returns:
        The paths written, relative to the root.
    """
    from exporter.archive.plot import plot_statistic

    root = Path(root)
    for path in (CARD, CARD_PLOT):  # no write through a link that leaves the archive
        resolve_inside(root, path, str(root))
    written = []
    plot_file: str | None = CARD_PLOT
    try:
        plot_statistic(read_index(root / TENSOR_INDEX_DIR), stat=PLOT_STAT, match=PLOT_MATCH,
                       out=root / CARD_PLOT,
                       title=f"{PLOT_STAT} norm of attention.dense.weight, by layer")
        written.append(CARD_PLOT)
    except ArchiveError:
        plot_file = None  # no model tensors were exported: a card without the plot
    text = card_text(root, repo_id, license=license, plot_file=plot_file, model_repo=model_repo)
    write_bytes_atomic(card_path(root), text.encode("utf-8"))
    return [CARD, *written]
