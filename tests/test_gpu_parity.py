"""CPU (NumPy) vs GPU (CuPy) parity of every codec in config/config.yaml (issue #6).

Each configured codec is built twice with ``build_codec`` (numpy and cupy) and run on synthetic
correlated KV shaped like SmolLM2 (``[3, 2048, 64]``) and Gemma-3 (``[1, 2048, 256]``), K and V.
Skipped with a reason when CuPy or a CUDA GPU is unavailable. Tolerances, per family, and why:

- identity, ggml (q8_0/q4_0): purely elementwise float32 arithmetic with the same operation
  order on both sides -> every stored array and the decoded tensor are **bit-identical**.
- turboquant (both variants): the rotation is a GEMM whose float32 summation order differs
  between OpenBLAS and cuBLAS, so a value within an ulp of a centroid midpoint (or a QJL
  projection within an ulp of 0) can land on the other side: spec turboquant.md section 7 item 6.
  Byte counts are identical (data-independent layout); packed codes agree in >= 99.9% of their
  bits; stored norms to 2e-3 relative (one fp16 ulp is 1e-3) in >= 99% of the rows (a row
  with a flipped index has another ``||c[idx]||``, so another corrected norm); decoded tensors
  differ by ``||d_gpu - d_cpu|| / ||x|| < 2e-2`` (a flip moves a coordinate by a centroid gap).
- kakeya, kakeyaturbo (PCA + spherical K-means): the GPU eigen-decomposition (float32 Jacobi)
  and float32 GEMMs differ from LAPACK/OpenBLAS at the 1e-6 level. ``d_eff`` (and so the bytes)
  only changes if a cumulative-variance ratio sits within that of the threshold: >= 99% of the
  blocks must have identical ``d_eff`` (with the few blocks here: all of them), and then the byte
  counts are identical. The same 1e-6 differences flip bf16/f16 roundings of the stored basis and
  some K-means decisions, which cascade within a block, so encoded codes are not compared
  elementwise: the decoded error statistics must agree (relative MSE within 5%), and decoding the
  *NumPy* encoding on the GPU must reproduce the NumPy decode to float32 round-off (1e-5
  relative), which checks the decoder exactly.
- split codecs: each stream by the rule of the family that encodes it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvbench.codecs.base import STREAMS, Encoded, build_codec, resolve_spec

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
CODECS = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["codecs"]
SHAPES = {"smollm2": (3, 2048, 64), "gemma": (1, 2048, 256)}


def kv_like(shape, seed: int) -> np.ndarray:
    """Correlated KV-like data: decaying spectrum in a random basis, AR(1) in time, per-head
    offsets and two outlier channels (as real keys have)."""
    n_kv, t, d = shape
    rng = np.random.default_rng(seed)
    decay = np.exp(-np.arange(d) / (d / 10.0))
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    e = rng.standard_normal((n_kv, t, d))
    z = np.empty_like(e)
    z[:, 0] = e[:, 0]
    for i in range(1, t):
        z[:, i] = 0.8 * z[:, i - 1] + 0.6 * e[:, i]
    x = (z * decay) @ q + 0.3 * rng.standard_normal((n_kv, 1, d))
    x[..., :2] *= 6.0
    return x.astype(np.float32)


def family_of(name: str, stream: str) -> str:
    spec = resolve_spec(name, CODECS)
    return spec[stream]["family"] if spec["family"] == "split" else spec["family"]


def rel_mse(x, y) -> float:
    return float(np.sum((y.astype(np.float64) - x) ** 2) / np.sum(x.astype(np.float64) ** 2))


def _to_host(cp, enc: Encoded) -> dict:
    return {k: cp.asnumpy(v) for k, v in enc.arrays.items()}


def _same_d_eff(e_np: Encoded, e_cp: Encoded) -> float:
    a = np.asarray(e_np.meta.get("d_eff", []))
    b = np.asarray(e_cp.meta.get("d_eff", []))
    assert a.shape == b.shape
    return 1.0 if a.size == 0 else float(np.mean(a == b))


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("name", list(CODECS))
def test_codec_parity(cp, name, shape_name):
    shape = SHAPES[shape_name]
    x = kv_like(shape, seed=zlib.crc32(f"{name}/{shape_name}".encode()))
    c_np = build_codec(name, CODECS, np)
    c_cp = build_codec(name, CODECS, cp)
    for stream in STREAMS:
        fam = family_of(name, stream)
        e_np = c_np.encode(x, stream=stream, layer=1)
        e_cp = c_cp.encode(cp.asarray(x), stream=stream, layer=1)
        y_np = c_np.decode(e_np)
        y_cp = cp.asnumpy(c_cp.decode(e_cp))
        assert y_cp.shape == x.shape and y_cp.dtype == np.float32
        h_cp = _to_host(cp, e_cp)
        ctx = (name, shape_name, stream)
        if fam in ("identity", "ggml"):
            assert c_np.nbytes(e_np) == c_cp.nbytes(e_cp), ctx
            for k, a in e_np.arrays.items():
                np.testing.assert_array_equal(h_cp[k], a, err_msg=str((ctx, k)))
            np.testing.assert_array_equal(y_cp, y_np, err_msg=str(ctx))
        elif fam == "turboquant":
            assert c_np.nbytes(e_np) == c_cp.nbytes(e_cp), ctx
            assert c_np.legacy_nbytes(e_np) == c_cp.legacy_nbytes(e_cp), ctx
            for k, a in e_np.arrays.items():
                g = h_cp[k]
                assert g.shape == a.shape and g.dtype == a.dtype, (ctx, k)
                if k.startswith("codes") or k == "signs":
                    flips = int(np.unpackbits(a ^ g).sum())
                    assert flips <= 1e-3 * a.size * 8, (ctx, k, flips, a.size * 8)
                else:  # a flipped index changes ||c[idx]||, hence that row's corrected norm
                    close = np.isclose(g.astype(np.float32), a.astype(np.float32), rtol=2e-3)
                    assert close.mean() >= 0.99, (ctx, k, close.mean())
            rel = np.linalg.norm(y_cp - y_np) / np.linalg.norm(x)
            assert rel < 2e-2, (ctx, rel)
        elif fam in ("kakeya", "kakeyaturbo"):
            assert _same_d_eff(e_np, e_cp) >= 0.99, ctx
            assert c_np.nbytes(e_np) == c_cp.nbytes(e_cp), ctx
            assert c_np.legacy_nbytes(e_np) == c_cp.legacy_nbytes(e_cp), ctx
            err_np, err_cp = rel_mse(x, y_np), rel_mse(x, y_cp)
            assert abs(err_cp - err_np) <= 0.05 * err_np + 1e-7, (ctx, err_np, err_cp)
            moved = Encoded(
                e_np.shape, {k: cp.asarray(v) for k, v in e_np.arrays.items()}, dict(e_np.meta)
            )
            y_mv = cp.asnumpy(c_cp.decode(moved))
            scale = float(np.linalg.norm(y_np))
            assert np.linalg.norm(y_mv - y_np) <= 1e-5 * scale, ctx
        else:
            pytest.fail(f"no parity rule for family {fam!r} ({ctx})")
