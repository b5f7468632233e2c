"""Compile-once cache for the CUDA kernel families of :mod:`kvbench.codecs.gpu` (CuPy, NVRTC).

Every family keeps its CUDA source as a string and goes through :func:`compiled`, so a kernel is
built once per device and set of ``#define`` values; CuPy is only touched for CuPy inputs.
"""

from __future__ import annotations

from types import ModuleType

#: Dynamic shared memory a block may use on Hopper (228 KB per SM, 1 KB reserved per block).
SMEM_LIMIT = 227 * 1024

_KERNELS: dict[tuple, object] = {}


def compiled(cp: ModuleType, source: str, name: str, defines: dict, smem: int = 0):
    """Kernel ``name`` of the CUDA ``source``, compiled once per device with ``defines`` (ints, or
    strings such as type names) as ``#define`` lines, its dynamic shared memory raised to ``smem``
    where that exceeds the 48 KB default."""
    items = tuple(sorted((n, v if isinstance(v, str) else int(v)) for n, v in defines.items()))
    key = (cp.cuda.Device().id, source, name, items)
    k = _KERNELS.get(key)
    if k is None:
        head = "".join(f"#define {n} {v}\n" for n, v in items)
        k = cp.RawKernel(head + source, name, options=("--std=c++17",))
        _KERNELS[key] = k
    if smem > 48 * 1024 and k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    return k


def device_array(cp: ModuleType, a, dtype):
    """``a`` as a C-contiguous ``dtype`` array whose data is 16-byte aligned (copied if not)."""
    a = cp.ascontiguousarray(a, dtype=dtype)
    return a if a.data.ptr % 16 == 0 else a.copy()
