"""Native libraries already mapped into this process, opened through ctypes.

kvbench calls two C functions its Python packages do not wrap: OpenBLAS's thread-count setters
(:mod:`kvbench.cpu_threads`) and cuSOLVER's batched eigensolver (:mod:`kvbench.codecs.linalg`).
Each must be the very copy NumPy or CuPy loaded (wheels bundle their own, under mangled names), so
they are found in the process's memory map rather than by library name.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def loaded_libraries(name_part: str) -> list[ctypes.CDLL]:
    """The shared libraries mapped into this process whose path contains ``name_part``, sorted by
    path; empty where ``/proc/self/maps`` cannot be read (not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = set()
    for line in maps.splitlines():
        path = line.split()[-1]
        if path.startswith("/") and name_part in path and ".so" in path:
            paths.add(path)
    return [ctypes.CDLL(p) for p in sorted(paths)]
