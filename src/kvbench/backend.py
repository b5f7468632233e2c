"""Array-module selection: every codec is written once against ``xp`` (NumPy or CuPy)."""

from __future__ import annotations

import logging
from types import ModuleType

import numpy as np

from kvbench.errors import KvbenchError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "gpu")


def _cupy_or_none() -> ModuleType | None:
    try:
        import cupy
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def get_xp(backend: str = "cpu") -> ModuleType:
    """Return numpy or cupy for ``backend`` in {auto, cpu, gpu}.

    ``gpu`` without a usable GPU is an error; ``auto`` falls back to NumPy and logs it.
    """
    if backend not in BACKENDS:
        raise KvbenchError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu":
        return np
    cp = _cupy_or_none()
    if cp is not None:
        return cp
    if backend == "gpu":
        raise KvbenchError(
            "backend: gpu was requested but no CUDA GPU is usable through CuPy "
            "(install the 'gpu' extra and check nvidia-smi), or set backend: auto|cpu"
        )
    log.warning("backend: auto found no usable CUDA GPU via CuPy; running on CPU (NumPy)")
    return np


def array_module(x) -> ModuleType:
    """The array module that owns ``x`` (cupy for device arrays, numpy otherwise)."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_numpy(x) -> np.ndarray:
    """Copy a device array to the host; numpy arrays pass through."""
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)
