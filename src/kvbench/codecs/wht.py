"""Shared transform and quantiser helpers: Walsh-Hadamard, sign flips, bit packing, Lloyd-Max.

One implementation used by ``kakeyaturbo`` and ``turboquant``. Every function takes the array
module ``xp`` (numpy or cupy) first and uses only ops that exist in both. Arrays are batched over
all leading axes; the transform / packing axis is always the **last** one.

API
---
``is_pow2(n)`` / ``next_pow2(n)`` / ``next_pow2_array(n)``
    Integer helpers; ``next_pow2(n)`` is 1 for ``n <= 1`` (as kakeyaturbo's ``wht_len``);
    ``next_pow2_array`` is the same over a host int array (int64).
``hadamard(xp, n, dtype=float32)``
    The unnormalised Sylvester (natural-order) Hadamard matrix ``H_n`` (entries +-1, symmetric,
    ``H_n @ H_n = n I``). The top-left ``m x m`` block of ``H_n`` is ``H_m`` for ``m <= n``.
``fwht(xp, x)``
    Unnormalised fast WHT over the last axis (length a power of 2): butterflies h = 1, 2, 4, ...
    with ``(a, b) -> (a + b, a - b)``; equals ``x @ hadamard(n)``; ``fwht(fwht(x)) == n * x``.
    For the orthonormal transform divide by ``sqrt(n)`` (TurboQuant), for kakeyaturbo's
    inverse divide by ``n``. Returns a new array (float dtype of ``x``).
``signed_hadamard(xp, signs, n_rows=None)``
    ``diag(signs) @ H_n`` (first ``n_rows`` rows): ``y = (signs * x) @ H`` becomes one GEMM,
    ``x @ signed_hadamard(signs)``; the inverse ``signs * (y @ H) / n`` is
    ``y @ signed_hadamard(signs).T / n``. For short vectors (n <= ~512) one GEMM beats the
    butterfly on both numpy and cupy.
``apply_signs(xp, x, signs)``
    ``x * signs`` over the last axis (signs +-1, any numeric dtype), result in ``x``'s dtype.
``pack_bits(xp, codes, bits, bitorder="little")``
    Pack unsigned integer codes ``[..., n]`` (each ``< 2**bits``, ``bits`` in 1..8) into
    ``uint8[..., ceil(n*bits/8)]``. ``little`` (default, kakeyaturbo): an LSB-first bitstream,
    code ``j`` occupies stream bits ``[j*bits, (j+1)*bits)`` with its LSB first, stream bit ``i`` is
    bit ``i % 8`` of byte ``i // 8``. ``big``: the mirror image (code MSB first, byte MSB first),
    i.e. ``np.packbits`` of the big-endian bits. Trailing pad bits are zero.
``unpack_bits(xp, packed, bits, n, bitorder="little")``
    Inverse of ``pack_bits``: ``uint8[..., >= ceil(n*bits/8)]`` -> ``uint8[..., n]`` (values
    ``< 2**bits``; bytes beyond the first ``ceil(n*bits/8)`` are ignored).
``packed_nbytes(n, bits)``
    ``ceil(n*bits/8)``.
``KT_LLOYD_MAX[bits]``
    kakeyaturbo's N(0,1) Lloyd-Max centroid tables for 1..4 bits (ascending; index 0 most
    negative), exactly the constants of the Rust crate (spec kakeya.md 2.6).
``quantize_nearest(xp, z, centroids)``
    Index of the nearest centroid (sorted ascending) for every element of ``z``, ties to the
    lower index (= ``argmin_k (z - c_k)^2``, first on ties): counts midpoints strictly below z.
    Returns uint8 (int64 if more than 256 centroids).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

__all__ = [
    "KT_LLOYD_MAX",
    "apply_signs",
    "fwht",
    "hadamard",
    "is_pow2",
    "next_pow2",
    "next_pow2_array",
    "pack_bits",
    "packed_nbytes",
    "quantize_nearest",
    "signed_hadamard",
    "unpack_bits",
]


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    """Smallest power of two >= n; 1 for n <= 1."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def next_pow2_array(n) -> np.ndarray:
    """:func:`next_pow2` of every element of a host integer array, without a Python loop."""
    n = np.asarray(n, dtype=np.int64)
    bit_length = np.frexp(np.maximum(n - 1, 1).astype(np.float64))[1]  # exact below 2**53
    return np.where(n <= 1, 1, np.left_shift(1, bit_length.astype(np.int64)))


def _hadamard_np(n: int) -> np.ndarray:
    if not is_pow2(n):
        raise ValueError(f"Hadamard size must be a power of 2, got {n}")
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard(xp: ModuleType, n: int, dtype=np.float32):
    """Unnormalised Sylvester Hadamard matrix ``[n, n]`` (n a power of 2), entries +-1."""
    return xp.asarray(_hadamard_np(n).astype(dtype))


def fwht(xp: ModuleType, x):
    """Unnormalised fast Walsh-Hadamard transform over the last axis (natural/Sylvester order).

    ``fwht(fwht(x)) == n * x``; equals ``x @ hadamard(xp, n)``.
    """
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht: last axis must be a power of 2, got {n}")
    lead = x.shape[:-1]
    y = xp.array(x, copy=True)
    if not xp.issubdtype(y.dtype, xp.floating):
        y = y.astype(xp.float32)
    h = 1
    while h < n:
        v = y.reshape(lead + (n // (2 * h), 2, h))
        a = v[..., 0, :]
        b = v[..., 1, :]
        y = xp.stack((a + b, a - b), axis=-2).reshape(lead + (n,))
        h *= 2
    return y


def signed_hadamard(xp: ModuleType, signs, n_rows: int | None = None, dtype=np.float32):
    """``diag(signs) @ H_n`` restricted to its first ``n_rows`` rows (host signs or xp array)."""
    s = np.asarray(signs.get() if hasattr(signs, "get") else signs, dtype=dtype)
    n = s.shape[-1]
    m = (s[:, None] * _hadamard_np(n).astype(dtype))[: (n if n_rows is None else n_rows)]
    return xp.asarray(np.ascontiguousarray(m))


def apply_signs(xp: ModuleType, x, signs):
    """``x * signs`` over the last axis, keeping ``x``'s dtype."""
    return x * xp.asarray(signs).astype(x.dtype)


def packed_nbytes(n: int, bits: int) -> int:
    return (int(n) * int(bits) + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(xp: ModuleType, codes, bits: int, bitorder: str = "little"):
    """Pack codes ``[..., n]`` (< 2**bits) into ``uint8[..., ceil(n*bits/8)]`` (see module doc)."""
    _check_bits(bits)
    if bitorder not in ("little", "big"):
        raise ValueError(f"bitorder must be 'little' or 'big', got {bitorder!r}")
    # every 8 codes fill exactly `bits` bytes: build each group's 8*bits-bit word, then split it
    lead = codes.shape[:-1]
    n = codes.shape[-1]
    n8 = -(-n // 8)
    wt = xp.uint32 if bits <= 4 else xp.uint64
    c = (codes.astype(xp.uint8) & xp.uint8((1 << bits) - 1)).astype(wt)
    if n8 * 8 != n:
        c = xp.concatenate((c, xp.zeros(lead + (n8 * 8 - n,), dtype=wt)), axis=-1)
    c = c.reshape(lead + (n8, 8))
    big = bitorder == "big"
    word = xp.zeros(lead + (n8,), dtype=wt)
    for j in range(8) if big else range(7, -1, -1):  # code 0 ends in the high (big) / low bits
        word <<= wt(bits)
        word |= c[..., j]
    out = xp.empty(lead + (n8, bits), dtype=xp.uint8)
    for m in range(bits):
        out[..., m] = (word >> wt(8 * (bits - 1 - m) if big else 8 * m)).astype(xp.uint8)
    return out.reshape(lead + (n8 * bits,))[..., : packed_nbytes(n, bits)]


def unpack_bits(xp: ModuleType, packed, bits: int, n: int, bitorder: str = "little"):
    """Inverse of :func:`pack_bits`: ``uint8[..., >= ceil(n*bits/8)]`` -> ``uint8[..., n]``."""
    _check_bits(bits)
    if bitorder not in ("little", "big"):
        raise ValueError(f"bitorder must be 'little' or 'big', got {bitorder!r}")
    nb = packed_nbytes(n, bits)
    lead = packed.shape[:-1]
    n8 = -(-n // 8)
    p = packed[..., :nb].astype(xp.uint8)
    if n8 * bits != nb:
        p = xp.concatenate((p, xp.zeros(lead + (n8 * bits - nb,), dtype=xp.uint8)), axis=-1)
    p = p.reshape(lead + (n8, bits))
    big = bitorder == "big"
    wt = xp.uint32 if bits <= 4 else xp.uint64
    word = xp.zeros(lead + (n8,), dtype=wt)
    for m in range(bits) if big else range(bits - 1, -1, -1):
        word <<= wt(8)
        word |= p[..., m]
    out = xp.empty(lead + (n8, 8), dtype=xp.uint8)
    mask = wt((1 << bits) - 1)
    for j in range(8):
        out[..., j] = ((word >> wt(bits * (7 - j) if big else bits * j)) & mask).astype(xp.uint8)
    return out.reshape(lead + (n8 * 8,))[..., :n]


def _sym(pos: list[float]) -> tuple[float, ...]:
    return tuple([-v for v in reversed(pos)] + list(pos))


#: kakeyaturbo's N(0,1) Lloyd-Max tables (Rust crate constants), ascending, index 0 most negative.
KT_LLOYD_MAX: dict[int, tuple[float, ...]] = {
    1: _sym([0.798156]),
    2: _sym([0.4528, 1.5100]),
    3: _sym([0.244943, 0.756268, 1.343757, 2.151945]),
    4: _sym([0.1281, 0.3885, 0.6566, 0.9422, 1.2563, 1.6177, 2.0690, 2.7322]),
}


def quantize_nearest(xp: ModuleType, z, centroids):
    """Nearest-centroid index of every element of ``z`` (centroids ascending; ties -> lower)."""
    c = np.asarray(centroids.get() if hasattr(centroids, "get") else centroids, dtype=np.float64)
    mids = ((c[1:] + c[:-1]) / 2).astype(np.float32)
    idx = xp.searchsorted(xp.asarray(mids), xp.ascontiguousarray(z, dtype=xp.float32), side="left")
    return idx.astype(xp.uint8 if c.size <= 256 else xp.int64)
