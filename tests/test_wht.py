"""Shared WHT / sign / bit-packing / Lloyd-Max helpers (kvbench.codecs.wht)."""

import numpy as np
import pytest

from kvbench.codecs.wht import (
    KT_LLOYD_MAX,
    apply_signs,
    fwht,
    hadamard,
    next_pow2,
    pack_bits,
    packed_nbytes,
    quantize_nearest,
    signed_hadamard,
    unpack_bits,
)


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 108, 128, 129)] == [
        1,
        1,
        2,
        4,
        4,
        8,
        128,
        128,
        256,
    ]


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_fwht_involution_and_matrix(n):
    rng = np.random.default_rng(n)
    xi = rng.integers(-50, 50, size=(3, 5, n)).astype(np.float32)  # exact in f32
    assert np.array_equal(fwht(np, fwht(np, xi)), n * xi)
    h = hadamard(np, n)
    assert np.array_equal(fwht(np, xi), xi @ h)
    assert np.array_equal(h, h.T) and np.array_equal(h @ h, n * np.eye(n, dtype=np.float32))
    xf = rng.standard_normal((4, n)).astype(np.float32)
    np.testing.assert_allclose(fwht(np, fwht(np, xf)), n * xf, rtol=1e-5, atol=1e-4)
    # natural (Sylvester) order: row 1 alternates, and H_m is the top-left block of H_n
    if n >= 2:
        assert h[1, :4].tolist()[: min(4, n)] == [1, -1, 1, -1][: min(4, n)]
        np.testing.assert_array_equal(h[: n // 2, : n // 2], hadamard(np, n // 2))


def test_fwht_rejects_non_pow2():
    with pytest.raises(ValueError):
        fwht(np, np.zeros((2, 12), np.float32))


def test_signed_hadamard_matches_butterfly_and_inverts():
    rng = np.random.default_rng(0)
    n = 32
    s = np.where(rng.random(n) < 0.5, -1, 1).astype(np.int8)
    x = rng.standard_normal((6, n)).astype(np.float32)
    m = signed_hadamard(np, s)
    y = fwht(np, apply_signs(np, x, s))
    np.testing.assert_allclose(x @ m, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y @ m.T / n, x, rtol=1e-5, atol=1e-5)
    # truncated rows: inputs zero beyond n_rows
    np.testing.assert_allclose(x[:, :5] @ signed_hadamard(np, s, n_rows=5), x[:, :5] @ m[:5])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 13, 64, 129])
@pytest.mark.parametrize("order", ["little", "big"])
def test_pack_roundtrip(bits, n, order):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 1 << bits, size=(2, 3, n)).astype(np.uint8)
    p = pack_bits(np, codes, bits, order)
    assert p.dtype == np.uint8 and p.shape == (2, 3, packed_nbytes(n, bits))
    assert np.array_equal(unpack_bits(np, p, bits, n, order), codes)


def test_pack_layout():
    # LSB-first stream: code j at bits [3j, 3j+3): 1 -> 001, 2 -> 010, 3 -> 011
    assert pack_bits(np, np.array([1, 2, 3]), 3).tolist() == [0b11010001, 0b0]
    b = np.random.default_rng(1).integers(0, 2, size=(3, 20)).astype(np.uint8)
    assert np.array_equal(pack_bits(np, b, 1), np.packbits(b, axis=-1, bitorder="little"))
    assert np.array_equal(pack_bits(np, b, 1, "big"), np.packbits(b, axis=-1))
    # pad bits are zero, so a shorter code prefix packs to a byte prefix
    c = np.array([[5, 1, 7, 2, 0, 0, 0, 0]], np.uint8)
    assert np.array_equal(pack_bits(np, c, 3)[:, :2], pack_bits(np, c[:, :5], 3)[:, :2])
    with pytest.raises(ValueError):
        pack_bits(np, c, 0)


def test_lloyd_max_tables_and_nearest():
    for b, c in KT_LLOYD_MAX.items():
        c = np.asarray(c)
        assert c.size == 1 << b and np.all(np.diff(c) > 0) and np.allclose(c, -c[::-1])
    assert KT_LLOYD_MAX[3][4:] == (0.244943, 0.756268, 1.343757, 2.151945)
    c = np.asarray(KT_LLOYD_MAX[3], np.float32)
    z = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32) * 2
    ref = np.argmin((z[..., None] - c) ** 2, axis=-1)
    assert np.array_equal(quantize_nearest(np, z, c), ref)
    # ties go to the lower index (z = 0 is the midpoint of centroids 3 and 4)
    assert quantize_nearest(np, np.zeros(1, np.float32), c).tolist() == [3]
