"""Fused llama.cpp-format TurboQuant kernels (``kernels.tq_llama_encode`` / ``tq_llama_decode``).

GPU only (``-m gpu``; skipped with a reason without CuPy and a CUDA GPU). The kernels replace the
WHT GEMM by an in-register butterfly, whose float32 sums differ from the GEMM's in the last
ulp, so a value within rounding of a centroid midpoint may land on the other side. Rules, against
the NumPy path: >= 99.99% of the code indices agree, the stored fp16 norms in >= 99.9% of the
groups (a flipped index changes that group's corrected norm); decoding the NumPy encoding on the
GPU reproduces the NumPy decode to float32 round-off (1e-5 relative: the decoder alone); in the
GPU round trip every row whose codes and norms agree decodes to within 1e-5 of the NumPy row, and
the whole tensor within 1e-2 of ``||x||`` (one flipped index, a centroid gap of ~0.1 of its row's
norm, already costs ~1e-3 over 8192 rows). Head dims 64, 128, 256
(power-of-two groups), 96 and 80 (zero-padded to one 128-group), 32 (a 32-group), and 90 (not a
multiple of 4: the unfused path, under the parity rule of tests/test_gpu_parity.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvbench.codecs.base import Encoded, build_codec
from kvbench.codecs.gpu import turboquant_llama as kernels
from kvbench.codecs.turboquant import unpack_codes

pytestmark = pytest.mark.gpu


def kv_rows(n: int, d: int, seed: int) -> np.ndarray:
    """``[1, n, d]`` float32 rows with a decaying spectrum, two outlier channels, a zero row and
    a row far below the 1e-10 norm guard."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = (rng.standard_normal((n, d)) * np.exp(-np.arange(d) / (d / 8.0))) @ q
    x[:, :2] *= 6.0
    x[1] = 0.0
    x[2] = 1e-13
    return x.astype(np.float32)[None]


def _codec(bits: int, xp):
    spec = {"family": "turboquant", "variant": "llamacpp", "bits": bits}
    return build_codec("t", {"t": spec}, xp)


def _host(cp, enc: Encoded) -> dict:
    return {k: cp.asnumpy(v) for k, v in enc.arrays.items()}


def _indices(arrays: dict, bits: int, dp: int) -> np.ndarray:
    planes = {k[len("codes_") :]: v for k, v in arrays.items() if k.startswith("codes_")}
    return unpack_codes(np, planes, bits, dp)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128, 256, 96, 80, 32, 90])
def test_fused_llama_matches_numpy(cp, d, bits):
    c_np, c_cp = _codec(bits, np), _codec(bits, cp)
    g, dp = c_np._llama_layout(d)
    fused = kernels.tql_fused_ok(cp, g, d, bits)
    assert fused == (d % 4 == 0)
    x = kv_rows(8192, d, seed=d * 10 + bits)
    for stream in ("k", "v"):
        e_np = c_np.encode(x, stream=stream)
        e_cp = c_cp.encode(cp.asarray(x), stream=stream)
        h = _host(cp, e_cp)
        assert set(h) == set(e_np.arrays)
        for k, a in e_np.arrays.items():
            assert h[k].shape == a.shape and h[k].dtype == a.dtype, k
        assert c_np.nbytes(e_np) == c_cp.nbytes(e_cp)
        same = np.mean(_indices(h, bits, dp) == _indices(e_np.arrays, bits, dp))
        norms_np = e_np.arrays["norms"].astype(np.float32)
        close = np.isclose(h["norms"].astype(np.float32), norms_np, rtol=2e-3).mean()
        y_np = c_np.decode(e_np)
        y_cp = cp.asnumpy(c_cp.decode(e_cp))
        assert y_cp.shape == x.shape and y_cp.dtype == np.float32
        rel = np.linalg.norm(y_cp - y_np) / np.linalg.norm(x)
        if not fused:  # the unfused CuPy path: the parity rule of test_gpu_parity.py
            assert same >= 0.999 and close >= 0.99 and rel < 2e-2, (same, close, rel)
            continue
        assert same >= 0.9999, same
        assert close >= 0.999, close
        if bits == 4:
            assert not h["rnorms"].any()
        moved = Encoded(
            e_np.shape, {k: cp.asarray(v) for k, v in e_np.arrays.items()}, dict(e_np.meta)
        )
        y_mv = cp.asnumpy(c_cp.decode(moved))
        assert np.linalg.norm(y_mv - y_np) <= 1e-5 * np.linalg.norm(y_np)
        agree = (_indices(h, bits, dp) == _indices(e_np.arrays, bits, dp)).all(axis=1)
        agree &= (h["norms"] == e_np.arrays["norms"]).all(axis=1)
        err = np.linalg.norm(y_cp[0] - y_np[0], axis=1)
        assert (err[agree] <= 1e-5 * np.linalg.norm(y_np[0], axis=1)[agree]).all()
        assert rel < 1e-2, rel


def test_fused_llama_float32_norms_uncorrected(cp):
    """float32 norms and no norm correction (stored norm = ||u||, summed in another order)."""
    spec = {"family": "turboquant", "variant": "llamacpp", "bits": 3}
    spec |= {"norm_dtype": "float32", "norm_correction": False}
    c_np = build_codec("t", {"t": spec}, np)
    c_cp = build_codec("t", {"t": spec}, cp)
    x = kv_rows(4096, 256, seed=7)
    e_np = c_np.encode(x, stream="v")
    e_cp = c_cp.encode(cp.asarray(x), stream="v")
    assert e_cp.arrays["norms"].dtype == cp.float32
    same = np.mean(_indices(e_np.arrays, 3, 256) == _indices(_host(cp, e_cp), 3, 256))
    assert same >= 0.9999, same
    np.testing.assert_allclose(cp.asnumpy(e_cp.arrays["norms"]), e_np.arrays["norms"], rtol=3e-6)
    y_cp = cp.asnumpy(c_cp.decode(e_cp))
    assert np.linalg.norm(y_cp - c_np.decode(e_np)) <= 1e-2 * np.linalg.norm(x)
