"""Engine and client state of a checkpoint (``mp_rank_XX_model_states.pt``) as JSON + tensors.

DeepSpeed ``runtime/engine.py`` ``_save_checkpoint`` writes ``module`` (None for pipeline saves,
whose weights are in the layer files), ``optimizer`` (None under ZeRO), ``lr_scheduler``,
``csr_tensor_module_names``, ``skipped_steps``, ``global_steps``, ``global_samples``,
``dp_world_size``, ``mp_world_size``, ``ds_config``, ``ds_version`` and, in current
versions, ``param_shapes``; GPT-NeoX adds its client state (``iteration``, ``args``,
``random_rng_state``, ``np_rng_state``, ``torch_rng_state``, ``cuda_rng_state``,
``data_loading`` ...; gpt-neox ``megatron/checkpointing.py`` ``save_ds_checkpoint``).
Every value is kept: tensors go to ``state.safetensors`` under ``{file}.{key path}``, the rest
to JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.dtypes import uint8
from exporter.errors import ExporterError
from exporter.neox.checkpoint import CheckpointFiles
from exporter.records import SAFETENSORS_DTYPES, TensorJob
from exporter.torchfile import TensorRef, TorchFile, iter_tensors, load_torch_file, to_json


@dataclass
class EngineState:
    """The engine-state files of one checkpoint.

    Attributes:
        roots: mp rank -> the file's object tree (tensors as records).
        json: file stem -> JSON rendering (tensors replaced by ``{"__tensor__": name}``).
        tensor_jobs: tensor-valued state, to be written to ``state.safetensors``.
        globals: file name -> the globals its pickle names.
    """

    roots: dict[int, Any]
    json: dict[str, Any]
    tensor_jobs: list[TensorJob]
    globals: dict[str, dict[str, bool]] = field(default_factory=dict)

    def value(self, key: str, default: Any = None) -> Any:
        """A top-level value of ``mp_rank_00`` (``iteration``, ``global_steps`` ...)."""
        root = self.roots.get(0)
        if isinstance(root, dict) and key in root:
            return root[key]
        return default

    @property
    def iteration(self) -> int | None:
        for key in ("iteration", "global_steps"):
            value = self.value(key)
            if isinstance(value, int):
                return value
        return None


def tensor_state_jobs(tf: TorchFile, prefix: str) -> tuple[dict[int, str], list[TensorJob]]:
    """Jobs for every tensor in ``tf`` named ``{prefix}.{path}``; id(ref) -> name."""
    names: dict[int, str] = {}
    jobs: list[TensorJob] = []
    for path, ref in iter_tensors(tf.obj):
        name = f"{prefix}.{path}"
        names[id(ref)] = name
        if ref.dtype in SAFETENSORS_DTYPES:
            jobs.append(TensorJob(name, "state", ref.dtype, ref.shape, ref.iter_chunks))
        else:
            # safetensors has no such dtype (complex128, quantized ...): keep the raw bytes;
            # state.json records the real dtype and shape.
            jobs.append(TensorJob(name, "state", uint8, (ref.nbytes,), _bytes_of(ref)))
    return names, jobs


def _bytes_of(ref: TensorRef) -> Callable[[int], Iterator[np.ndarray]]:
    def gen(max_bytes: int) -> Iterator[np.ndarray]:
        for chunk in ref.iter_chunks(max_bytes):
            yield chunk.reshape(-1).view(np.uint8)

    return gen


def render(obj: Any, names: dict[int, str]) -> Any:
    """JSON of ``obj`` with each tensor replaced by a pointer into ``state.safetensors``."""

    def tensor(ref: TensorRef) -> Any:
        out = {"__tensor__": names[id(ref)], "dtype": str(ref.dtype).removeprefix("torch."),
               "shape": list(ref.shape)}
        if ref.dtype not in SAFETENSORS_DTYPES:
            out["stored_as"] = "uint8 bytes (little-endian, row-major)"
        return out

    return to_json(obj, tensor=tensor)


def read_engine_state(files: CheckpointFiles, exported_module: bool) -> EngineState:
    """Read every ``mp_rank_XX_model_states.pt`` of ``files``.

    Args:
        exported_module: the ``module`` weights (non-pipeline saves) are written as model
            weights, so they are not repeated in the state.
    """
    roots: dict[int, Any] = {}
    rendered: dict[str, Any] = {}
    jobs: list[TensorJob] = []
    globals_: dict[str, dict[str, bool]] = {}
    for mp, path in sorted(files.mp_files.items()):
        tf = load_torch_file(path)
        roots[mp] = tf.obj
        globals_[path.name] = tf.globals
        obj = tf.obj
        if exported_module and isinstance(obj, dict) and isinstance(obj.get("module"), dict):
            obj = {**obj, "module": "exported as model weights"}
        stem = path.name.removesuffix(".pt")
        try:
            names, file_jobs = tensor_state_jobs(TorchFile(tf.path, obj, tf.globals), stem)
            rendered[stem] = render(obj, names)
        except ExporterError as exc:
            if str(path) in str(exc):
                raise
            raise type(exc)(f"{path}: {exc}") from exc
        jobs += file_jobs
    return EngineState(roots, rendered, jobs, globals_)
