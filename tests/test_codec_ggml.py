"""ggml q8_0 / q4_0 baselines: exact bytes, ggml's reference rounding, per-block error bounds."""

import math

import numpy as np
import pytest

from kvbench.codecs.base import build_from_spec
from kvbench.errors import KvbenchError


def ggml(t):
    return build_from_spec(t, {"family": "ggml", "type": t})


def data(shape=(2, 40, 64), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 30, shape[:-1] + (1,))
    x = x.astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero block
    x[0, 1, :32] = np.float32(-2.0)  # a constant negative block (q4_0: the max is negative)
    x[1, 2, 5] = 1e4  # an outlier
    return x


def ref_q8_0(x):
    """Straight per-block quantize_row_q8_0_ref + dequantize_row_q8_0, one block at a time."""
    out = np.empty_like(x)
    flat, res = x.reshape(-1, 32), out.reshape(-1, 32)
    for i, blk in enumerate(flat):
        amax = np.float32(max(abs(float(v)) for v in blk))
        d = np.float32(amax / np.float32(127))
        inv = np.float32(1) / d if d else np.float32(0)
        q = []
        for v in blk:
            p = float(np.float32(v * inv))  # float32 product, exact in double
            q.append(int(math.copysign(math.floor(abs(p) + 0.5), p)))  # C roundf
        res[i] = np.array(q, np.float32) * np.float32(np.float16(d))
    return out


def ref_q4_0(x):
    out = np.empty_like(x)
    flat, res = x.reshape(-1, 32), out.reshape(-1, 32)
    for i, blk in enumerate(flat):
        amax, mx = 0.0, 0.0
        for v in blk:
            if amax < abs(float(v)):
                amax, mx = abs(float(v)), float(v)
        d = np.float32(np.float32(mx) / np.float32(-8))
        inv = np.float32(1) / d if d else np.float32(0)
        q = [min(15, int(np.float32(np.float32(v * inv) + np.float32(8.5)))) for v in blk]
        res[i] = (np.array(q, np.float32) - 8) * np.float32(np.float16(d))
    return out


@pytest.mark.parametrize("t, per_block", [("q8_0", 34), ("q4_0", 18)])
def test_exact_bytes(t, per_block):
    x = data((3, 7, 128))
    codec = ggml(t)
    enc = codec.encode(x, "k")
    nb = codec.nbytes(enc)
    blocks = 3 * 7 * 128 // 32
    assert nb == {"codes": blocks * (per_block - 2), "norms": blocks * 2}
    assert sum(int(a.nbytes) for a in enc.arrays.values()) == blocks * per_block
    assert round(2 * x.size / sum(nb.values()), 3) == {"q8_0": 1.882, "q4_0": 3.556}[t]
    assert codec.compresses_sliding("k") and codec.compresses_sliding("v")


def test_q8_0_matches_reference_and_error_bound():
    x = data()
    codec = ggml("q8_0")
    enc = codec.encode(x, "v")
    x_hat = codec.decode(enc)
    np.testing.assert_array_equal(x_hat, ref_q8_0(x))
    # |x - x_hat| <= d/2 per block (d = absmax/127), plus the fp16 rounding of the stored scale
    blk, err = x.reshape(-1, 32), np.abs(x - x_hat).reshape(-1, 32).max(axis=1)
    d = np.abs(blk).max(axis=1) / 127
    d16 = enc.arrays["scales"].astype(np.float32)
    bound = d / 2 + 127 * np.abs(d - d16) + 1e-6 * np.abs(blk).max(axis=1)
    assert np.all(err <= bound)
    assert np.all(x_hat.reshape(-1, 32)[0] == 0)  # zero block stays zero


def test_q8_0_rounds_half_away_from_zero():
    # x * (1/d) lands on exact halves: 127 * [0.5/127 ...] -> roundf, not rint's ties-to-even
    blk = np.zeros(32, np.float32)
    blk[0] = 127.0
    blk[1:5] = [0.5, 1.5, 2.5, -2.5]
    x_hat = ggml("q8_0").decode(ggml("q8_0").encode(blk.reshape(1, 1, 32)))
    np.testing.assert_array_equal(x_hat[0, 0, 1:5], [1, 2, 3, -3])
    np.testing.assert_array_equal(x_hat, ref_q8_0(blk.reshape(1, 1, 32)))


def test_q4_0_matches_reference_and_layout():
    x = data()
    codec = ggml("q4_0")
    enc = codec.encode(x, "k")
    np.testing.assert_array_equal(codec.decode(enc), ref_q4_0(x))
    # byte j holds q[j] | q[j+16] << 4; the element of largest |x| maps to q = 0 exactly
    codes = enc.arrays["codes"]
    assert codes.shape == (x.size // 32, 16) and codes.dtype == np.uint8
    q = np.concatenate([codes & 15, codes >> 4], axis=1)
    j = np.abs(x.reshape(-1, 32)).argmax(axis=1)
    nz = np.abs(x.reshape(-1, 32)).max(axis=1) > 0
    assert np.all(q[np.arange(len(j)), j][nz] == 0)
    # step |d| = max|x|/8; worst case one full step (the clamp at q = 15), + fp16 scale rounding
    err = np.abs(x - codec.decode(enc)).reshape(-1, 32).max(axis=1)
    d = np.abs(x).reshape(-1, 32).max(axis=1) / 8
    d16 = np.abs(enc.arrays["scales"].astype(np.float32))
    assert np.all(err <= d + 8 * np.abs(d - d16) + 1e-6 * d)


def test_errors():
    with pytest.raises(KvbenchError, match="type"):
        ggml("q5_0")
    with pytest.raises(KvbenchError, match="multiple of the ggml block size 32"):
        ggml("q8_0").encode(np.zeros((1, 4, 80), np.float32))
    with pytest.raises(KvbenchError, match="unknown parameter"):
        build_from_spec("g", {"family": "ggml", "type": "q8_0", "block": 64})


@pytest.mark.gpu
@pytest.mark.parametrize("t", ["q8_0", "q4_0"])
def test_cupy_matches_numpy(cp, t):
    x = data((4, 300, 128))
    c_np = ggml(t)
    c_cp = build_from_spec(t, {"family": "ggml", "type": t}, cp)
    e_np, e_cp = c_np.encode(x), c_cp.encode(cp.asarray(x))
    assert c_np.nbytes(e_np) == c_cp.nbytes(e_cp)
    for key in e_np.arrays:
        np.testing.assert_array_equal(cp.asnumpy(e_cp.arrays[key]), e_np.arrays[key])
    np.testing.assert_array_equal(cp.asnumpy(c_cp.decode(e_cp)), c_np.decode(e_np))
