"""Chunked execution of the codecs' array paths: independent chunks of work on a small CPU
thread pool (NumPy), and the chunks' arrays joined back (also after CuPy's memory-sized chunks).

NumPy's ufuncs and OpenBLAS release the GIL, so chunks of rows or problems run in parallel on the
cores a job owns, and each chunk's temporaries stay in cache. Chunk bounds are fixed by the
caller from the input's shape, and each chunk writes only its own rows, so results never depend
on thread timing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from kvbench.native_libs import loaded_libraries


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="kvbench-cpu")


def workers() -> int:
    """Chunk threads: the job's ``OPENBLAS_NUM_THREADS`` (its CPU share), else every CPU."""
    env = os.environ.get("OPENBLAS_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else os.cpu_count() or 1


def map_chunks(fn: Callable[[Any], Any], chunks: Sequence, parallel: bool = True) -> list:
    """``[fn(c) for c in chunks]`` in order, run on up to :func:`workers` threads with OpenBLAS on
    one thread meanwhile (``parallel=False``: in this thread, e.g. for GPU work)."""
    n = min(workers(), len(chunks)) if parallel else 1
    if n <= 1:
        return [fn(c) for c in chunks]
    with one_blas_thread():
        return list(_pool(n).map(fn, chunks))


def join_chunks(xp, parts: list[dict]) -> dict:
    """Per-chunk array dicts (same keys, rows split along axis 0) joined back; ``None`` entries
    (arrays a configuration does not produce) are dropped."""
    if len(parts) == 1:
        return {k: v for k, v in parts[0].items() if v is not None}
    return {k: xp.concatenate([p[k] for p in parts]) for k, v in parts[0].items() if v is not None}


@contextmanager
def one_blas_thread():
    """Run NumPy's OpenBLAS on one thread inside the block (restored after; no-op if not found).

    Many small matmuls between element-wise steps: on a loaded machine idle OpenBLAS worker
    threads spinning between calls cost up to 8x the CPU time (measured in the attention metrics:
    30 SmolLM2 layers, 18 s vs 2.3 s with a second busy process on 2 cores); and under
    :func:`map_chunks` OpenBLAS's own threads would fight the chunk threads for the cores. Not
    reentrant across threads: call it from the thread that owns the work.
    """
    fns = _openblas_thread_fns()
    if fns is None:
        yield
        return
    get, set_ = fns
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


_BLAS_FNS: list = []


def _openblas_thread_fns():
    if not _BLAS_FNS:
        _BLAS_FNS.append(None)
        try:
            import ctypes

            for dll in loaded_libraries("openblas"):
                for prefix, suffix in (
                    ("scipy_openblas", "64_"),
                    ("openblas", ""),
                    ("openblas", "64_"),
                ):
                    get = getattr(dll, f"{prefix}_get_num_threads{suffix}", None)
                    set_ = getattr(dll, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and set_ is not None:
                        set_.argtypes = [ctypes.c_int]
                        _BLAS_FNS[0] = (get, set_)
                        break
                if _BLAS_FNS[0] is not None:
                    break
        except Exception:  # not Linux, no OpenBLAS, stripped symbols: leave threads alone
            _BLAS_FNS[0] = None
    return _BLAS_FNS[0]
