"""Array-module selection: every codec is written once against ``xp`` (NumPy or CuPy)."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
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


#: Locks held by this process (one per claimed GPU); released when the process exits.
_HELD_LOCKS: dict[int, int] = {}


def _lock_dir() -> Path:
    return Path(
        os.environ.get("KVBENCH_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / "kvbench-gpus")
    )


def acquire_device(device_ids: list[int], timeout_s: float = 24 * 3600, poll_s: float = 0.5) -> int:
    """Claim one device id from ``device_ids`` for the life of this process.

    Snakemake's ``resources: gpu=1`` bounds how many GPU jobs run at once but does not say which
    card each job gets; concurrent jobs therefore take a non-blocking ``flock`` on one lock file per
    device and use the first one they win. The kernel drops the lock when the process ends, even on
    a crash, so no stale claim survives. Under SLURM each job sees only its own card(s) via
    CUDA_VISIBLE_DEVICES, and the pool degenerates to "device 0".
    """
    if not device_ids:
        raise KvbenchError("no GPU device ids to choose from")
    for dev in _HELD_LOCKS:
        return dev
    lock_dir = _lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for dev in device_ids:
            fd = os.open(lock_dir / f"gpu{dev}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _HELD_LOCKS[dev] = fd
            log.info("claimed GPU %d (lock %s)", dev, lock_dir / f"gpu{dev}.lock")
            return dev
        if time.monotonic() > deadline:
            raise KvbenchError(f"no free GPU among {device_ids} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def visible_device_ids(cp: ModuleType | None) -> list[int]:
    """Device ids to pool: ``KVBENCH_GPU_IDS`` ("0,1") if set, else every CUDA device CuPy sees."""
    env = os.environ.get("KVBENCH_GPU_IDS")
    if env:
        return [int(i) for i in env.split(",") if i.strip()]
    return list(range(cp.cuda.runtime.getDeviceCount())) if cp is not None else []


def get_xp(backend: str = "cpu") -> ModuleType:
    """Return numpy or cupy for ``backend`` in {auto, cpu, gpu}.

    ``gpu`` without a usable GPU is an error; ``auto`` falls back to NumPy and logs it. On a GPU
    the process claims a free device from the pool (``acquire_device``) and makes it current.
    """
    if backend not in BACKENDS:
        raise KvbenchError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu":
        return np
    cp = _cupy_or_none()
    if cp is not None:
        cp.cuda.Device(acquire_device(visible_device_ids(cp))).use()
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


def device_free_bytes(cp: ModuleType) -> int:
    """Bytes a CuPy job can still allocate: free device memory plus its pool's cached blocks
    (codecs size their chunks from it, so any input fits the card)."""
    return cp.cuda.Device().mem_info[0] + cp.get_default_memory_pool().free_bytes()


def synchronize(xp: ModuleType) -> None:
    """Wait for queued device work (no-op on NumPy), so wall-clock timings mean something."""
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def to_numpy(x) -> np.ndarray:
    """Copy a device array to the host; numpy arrays pass through."""
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)
