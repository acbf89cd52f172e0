"""Whether a CUDA device can be used, asked of torch only where one may exist.

``torch.cuda.is_available()`` needs ``import torch``: about a second of one core and 190 MB
of memory (:mod:`exporter.dtypes`), which an export on the CPU otherwise never pays. A CUDA
device is reachable only through its driver's device nodes: ``/dev/nvidia*`` (NVIDIA's
driver, in containers too, where the runtime passes them in), ``/dev/kfd`` (AMD's, for ROCm
builds of torch, whose devices torch also calls ``cuda``) or ``/dev/dxg`` (WSL 2). Without any
of them no torch build can find a device, so the answer is no without asking; with one,
torch decides (it may be a CPU build, or the driver may have no device).
"""

from __future__ import annotations

import glob
import os

#: Device nodes through which a GPU driver is reached (module docstring).
DRIVER_NODES = ("/dev/nvidia*", "/dev/kfd", "/dev/dxg")


def cuda_available() -> bool:
    """Whether torch can use a CUDA (or ROCm) device here; imports torch only if a GPU
    driver's device node exists."""
    if not any(glob.glob(pattern) if "*" in pattern else os.path.exists(pattern)
               for pattern in DRIVER_NODES):
        return False
    import torch

    return bool(torch.cuda.is_available())
