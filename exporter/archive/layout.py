"""Every path inside an archive (DESIGN.md "Archive layout"); no other module spells one.

Paths come in two forms: relative POSIX strings (``steps/step8/model.safetensors``), as the
index records them and as they are named on the Hub, and local :class:`~pathlib.Path` s under
an archive root (``step_dir(root, 8)``).

    ARCHIVE/
      README.md                          dataset card (``push`` writes it)
      assets/                            the card's plot
      manifest.json
      index/tensors/step{N}.parquet      one row per tensor
      index/checkpoints/step{N}.parquet  one row per step
      index/deltas/step{N}.parquet       step-to-step change of each tensor (``deltas``)
      steps/step{N}/                     the step folder (:data:`STEP_FILES`)
      .push/step{N}.json                 local record of files removed after a verified push
      .downloads/                        Hub sources: the step being downloaded
      .lock                              held by the command writing the archive (archive.lock)
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "manifest.json"
CARD = "README.md"
CARD_PLOT = "assets/attention_dense_l2.png"
TENSOR_INDEX_DIR = "index/tensors"
CHECKPOINT_INDEX_DIR = "index/checkpoints"
DELTA_INDEX_DIR = "index/deltas"
ASSETS_DIR = "assets"
STEPS_DIR = "steps"
PUSH_STATE_DIR = ".push"
DOWNLOADS_DIR = ".downloads"
LOCK = ".lock"

# Files of a step folder, relative to it (exporter.pipeline.export writes them).
CONFIG = "config.json"
MODEL = "model.safetensors"
MODEL_SHARD_INDEX = "model.safetensors.index.json"
BUFFERS = "buffers.safetensors"
OPTIMIZER_DIR = "optimizer"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
NEOX_CONFIG = "neox.yml"
COMPRESSED_SUFFIX = ".zst"
#: ``__metadata__`` key of model files: the source checkpoint's model dtype (``float16``), which
#: ``verify`` needs when ``--dtype`` cast the weights once more.
SOURCE_DTYPE_KEY = "source_dtype"

#: The file of a step folder that holds each kind of tensor (model weights may be sharded).
KIND_FILES = {
    "model": MODEL,
    "master": f"{OPTIMIZER_DIR}/master.safetensors",
    "exp_avg": f"{OPTIMIZER_DIR}/exp_avg.safetensors",
    "exp_avg_sq": f"{OPTIMIZER_DIR}/exp_avg_sq.safetensors",
    "buffer": BUFFERS,
    "state": STATE_TENSORS,
}

#: What each file of a step folder holds (the dataset card lists these).
STEP_FILES = {
    CONFIG: "transformers model config",
    MODEL: "model weights, Hugging Face names",
    MODEL_SHARD_INDEX: "which shard holds each model weight",
    BUFFERS: "persistent buffers (rotary inv_freq)",
    KIND_FILES["master"]: "fp32 master weights (ZeRO partitions merged)",
    KIND_FILES["exp_avg"]: "Adam first moments",
    KIND_FILES["exp_avg_sq"]: "Adam second moments",
    STATE_JSON: "engine and optimizer state (iteration, lr, loss scale ...)",
    STATE_TENSORS: "tensor-valued engine state (rng states)",
    NEOX_CONFIG: "the GPT-NeoX config",
}

_STEP_NAME = re.compile(r"^step(\d+)$")
_STEP_FILE = re.compile(rf"^{STEPS_DIR}/step(\d+)/")
_SHARD_NAME = re.compile(r"^step(\d+)\.parquet$")


# -- relative paths (index rows, Hub paths) ---------------------------------------------------

def step_prefix(step: int | str) -> str:
    """``steps/step{N}``: the step folder, relative to the archive root."""
    return f"{STEPS_DIR}/step{step}"


def step_file(step: int | str, relative: str) -> str:
    """A file of a step folder, relative to the archive root."""
    return f"{step_prefix(step)}/{relative}"


def tensor_index_file(step: int | str) -> str:
    return f"{TENSOR_INDEX_DIR}/step{step}.parquet"


def checkpoint_index_file(step: int | str) -> str:
    return f"{CHECKPOINT_INDEX_DIR}/step{step}.parquet"


def delta_index_file(step: int | str) -> str:
    """The deltas shard of the step pair that ends at ``step``."""
    return f"{DELTA_INDEX_DIR}/step{step}.parquet"


def push_state_file(step: int) -> str:
    return f"{PUSH_STATE_DIR}/step{step}.json"


def model_shard_files(count: int) -> list[str]:
    """Names of a step's model files: ``model.safetensors``, or transformers' shard names
    (``model-00001-of-00003.safetensors``, ``modeling_utils`` / huggingface_hub
    ``split_torch_state_dict_into_shards``) when there are several."""
    if count == 1:
        return [MODEL]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def model_files(folder: Path) -> list[Path]:
    """The model weight files of a step folder (plain, else compressed), in name order."""
    plain = sorted(folder.glob("model*.safetensors"))
    return plain or sorted(folder.glob(f"model*.safetensors{COMPRESSED_SUFFIX}"))


def compressed(relative: str) -> str:
    """The name of a tensor file once compressed (``--compress zstd``)."""
    return relative + COMPRESSED_SUFFIX


def index_glob(folder: str) -> str:
    """The glob over one index table's shards (the card's ``data_files``)."""
    return f"{folder}/*.parquet"


def model_patterns(step: int) -> list[str]:
    """Hub ``allow_patterns`` that fetch a step's transformers folder."""
    return [step_file(step, CONFIG), step_file(step, "model*")]


def shard_step(name: str) -> int | None:
    """The step of an index shard's file name (``step8.parquet``), None for other names."""
    m = _SHARD_NAME.match(name)
    return int(m[1]) if m else None


def file_step(relative: str) -> int | None:
    """The step of a step folder's file, relative to the root (``steps/step8/x``), else None."""
    m = _STEP_FILE.match(relative)
    return int(m[1]) if m else None


def folder_step(name: str) -> int | None:
    """The step of a step folder's name (``step8``), None for other names."""
    m = _STEP_NAME.match(name)
    return int(m[1]) if m else None


# -- local paths under an archive root --------------------------------------------------------

def step_dir(root: Path, step: int) -> Path:
    return root / step_prefix(step)


def tensor_index_path(root: Path, step: int) -> Path:
    return root / tensor_index_file(step)


def checkpoint_index_path(root: Path, step: int) -> Path:
    return root / checkpoint_index_file(step)


def delta_index_path(root: Path, step: int) -> Path:
    return root / delta_index_file(step)


def manifest_path(root: Path) -> Path:
    return root / MANIFEST


def card_path(root: Path) -> Path:
    return root / CARD


def push_state_path(root: Path, step: int) -> Path:
    return root / push_state_file(step)


def downloads_dir(root: Path) -> Path:
    return root / DOWNLOADS_DIR


def lock_path(root: Path) -> Path:
    """The file whose ``flock`` a writer of the archive holds (:mod:`exporter.archive.lock`)."""
    return root / LOCK


def is_archive(root: Path) -> bool:
    """Whether ``root`` holds an archive (its manifest)."""
    return manifest_path(root).is_file()


#: Names an archive root may hold (everything above); any other name is not the archive's.
ARCHIVE_ENTRIES = frozenset({MANIFEST, CARD, CARD_PLOT.split("/")[0], TENSOR_INDEX_DIR.split("/")[0],
                             STEPS_DIR, PUSH_STATE_DIR, DOWNLOADS_DIR, LOCK})


def foreign_entries(root: Path) -> list[Path]:
    """What the folder ``root`` holds besides archive entries (temporaries of interrupted
    writes included: the caller tells them apart)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name not in ARCHIVE_ENTRIES)


def archive_of_step_dir(folder: Path) -> Path | None:
    """The archive root of a step folder (``ROOT/steps/stepN``), None for a lone step folder."""
    if folder.parent.name == STEPS_DIR and folder_step(folder.name) is not None:
        return folder.parent.parent
    return None
