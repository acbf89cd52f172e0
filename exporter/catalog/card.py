"""The dataset card (``README.md``) of a catalog: configs over its tables, the run table,
cross-seed plots, the comparisons made, and how to load it. Generated from the catalog's own
files only (no member is read), so it is the same bytes for the same catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from exporter.catalog.layout import (
    CARD_FILE,
    COMPARE_DIR,
    PLOT_BAND,
    PLOT_LINES,
    RUN_CHECKPOINTS_DIR,
    RUN_TENSORS_DIR,
    RUNS_TABLE,
    table_glob,
)
from exporter.errors import ExporterError
from exporter.files import write_bytes_atomic

TAGS = ["gpt-neox", "pythia", "polypythias", "checkpoints", "training-dynamics", "catalog"]
PLOT_STAT = "l2"
PLOT_MATCH = "layers.*.attention.dense.weight"


def catalog_metadata(license: str, pretty_name: str, with_compare: bool) -> dict[str, Any]:
    """The YAML front matter: one ``configs`` entry per table (the Hub's dataset card format)."""
    configs = [
        {"config_name": "runs", "default": True,
         "data_files": [{"split": "train", "path": RUNS_TABLE}]},
        {"config_name": "tensors",
         "data_files": [{"split": "train", "path": table_glob(RUN_TENSORS_DIR)}]},
        {"config_name": "checkpoints",
         "data_files": [{"split": "train", "path": table_glob(RUN_CHECKPOINTS_DIR)}]},
    ]
    if with_compare:
        configs.append({"config_name": "compare",
                        "data_files": [{"split": "train", "path": table_glob(COMPARE_DIR)}]})
    return {"license": license, "pretty_name": pretty_name, "tags": list(TAGS), "configs": configs}


def _archive_link(archive: str, revision: str | None) -> str:
    if archive.startswith("hf://datasets/"):
        repo = archive.removeprefix("hf://")
        at = f"/tree/{revision}" if revision else ""
        return f"[{repo.removeprefix('datasets/')}](https://huggingface.co/{repo}{at})"
    return f"`{archive}` (local)"


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def catalog_card_text(root: str | Path, repo_id: str | None = None, *,
                      license: str = "apache-2.0", plots: tuple[str, ...] = ()) -> str:
    """The card of the catalog at ``root``; ``repo_id`` (``ORG/NAME``) for the snippets."""
    root = Path(root)
    runs = pq.read_table(root / RUNS_TABLE).to_pylist()
    compares = sorted(p.relative_to(root).as_posix() for p in (root / COMPARE_DIR).glob("*.parquet"))
    name = (repo_id or root.resolve().name).split("/")[-1]
    location = f"hf://datasets/{repo_id}" if repo_id else str(root)
    out = ["---", yaml.safe_dump(catalog_metadata(license, f"{name}: runs side by side",
                                                  bool(compares)), sort_keys=False).rstrip(),
           "---", "", f"# {name}", "",
           f"A catalog of {len(runs)} GPT-NeoX training run(s): one Parquet index over the "
           "archives of every run (one row per tensor per step, with statistics, and one row per "
           "step), each row labelled with its run, model size, seed and variant. It holds no "
           "tensors: those stay in each run's archive and are read from there, one at a time.",
           "", "## Runs", "",
           "| run | model size | seed | variant | steps | archive | revision |",
           "|---|---|---:|---|---:|---|---|"]
    for r in runs:
        revision = f"`{r['revision'][:12]}`" if r["revision"] else "–"
        steps = f"{r['steps']} ({r['first_step']}–{r['last_step']})"
        out.append(f"| {r['run']} | {_cell(r['model_size'])} | {_cell(r['seed'])} | "
                   f"{r['variant']} | {steps} | {_archive_link(r['archive'], r['revision'])} | "
                   f"{revision} |")
    if plots:
        out += ["", "## Seeds side by side", ""]
        out += [f"![{PLOT_STAT} of {PLOT_MATCH} across runs]({p})" for p in plots]
        out += ["", f"Drawn from the index with `neox-export plot {location} --stat {PLOT_STAT} "
                f"--match '{PLOT_MATCH}' --group-by seed [--band] --out plot.png`."]
    if compares:
        out += ["", "## Comparisons", "",
                "Per step and tensor, the cosine similarity and relative l2 distance between two "
                "runs' tensors (`neox-export compare`):", ""]
        out += [f"- [{Path(p).stem.replace('__', ' vs ', 1).replace('__', ', ')}]({p})"
                for p in compares]
    example = runs[0]["run"] if runs else "RUN"
    out += ["", "## Loading", "", "```python", "from exporter import open_catalog", "",
            f"catalog = open_catalog(\"{location}\")",
            "catalog.runs                                   # one row per run",
            f"l2 = catalog.stats(\"{PLOT_MATCH}\", stat=\"l2\")   # every run, from the index",
            f"archive = catalog.run(\"{example}\")              # that run's archive",
            "```", ""]
    if repo_id:
        out += ["The tables, with `datasets`:", "", "```python",
                "from datasets import load_dataset", "",
                f"runs = load_dataset(\"{repo_id}\", \"runs\", split=\"train\")",
                f"tensors = load_dataset(\"{repo_id}\", \"tensors\", split=\"train\")", "```", ""]
    return "\n".join(out)


def write_catalog_card(root: str | Path, repo_id: str | None = None, *,
                       license: str | None = None, redraw: bool = True) -> list[str]:
    """Write the card and its plots into the catalog; the paths written, relative to it.

    ``license`` defaults to the one the catalog was built with (``catalog.json``); with
    ``redraw=False`` plots already there are kept (the runs did not change)."""
    from exporter.catalog.plot import plot_runs
    from exporter.catalog.reader import open_catalog

    root = Path(root)
    plots: list[str] = []
    catalog = open_catalog(root)
    license = license or str(catalog.manifest.get("license") or "apache-2.0")
    if not redraw and all((root / p).is_file() for p in (PLOT_LINES, PLOT_BAND)):
        plots = [PLOT_LINES, PLOT_BAND]
    elif catalog.runs.num_rows:
        for relative, band in ((PLOT_LINES, False), (PLOT_BAND, True)):
            try:
                plot_runs(catalog, stat=PLOT_STAT, match=PLOT_MATCH, band=band,
                          out=root / relative)
            except ExporterError:
                break  # no model tensors indexed: a card without plots
            plots.append(relative)
    text = catalog_card_text(root, repo_id, license=license, plots=tuple(plots))
    write_bytes_atomic(root / CARD_FILE, text.encode("utf-8"))
    return [CARD_FILE, *plots]
