"""kakeyaturbo (KT1.2): spec kakeya.md 2.x byte integers, round trip, legacy vs fixed, batching."""

import numpy as np
import pytest

import kvbench.codecs.kakeyaturbo as kt
from kvbench.codecs.base import bf16_round, build_codec, build_from_spec
from kvbench.codecs.rng import sign_pattern
from kvbench.codecs.wht import KT_LLOYD_MAX, fwht, next_pow2
from kvbench.errors import KvbenchError

LEGACY = {"family": "kakeyaturbo", "wht_scale": "legacy_sqrtN", "ip_decode": "legacy_unscaled"}
FIXED = {"family": "kakeyaturbo"}


def codec(**params):
    return build_from_spec("kt", {"family": "kakeyaturbo", **params})


def lowrank(n_kv, t, d, decay=6.0, seed=0, shared_basis=False):
    """Heads with a decaying spectrum in a random (per-head or shared) basis + a per-head mean."""
    rng = np.random.default_rng(seed)
    scales = np.exp(-np.arange(d) / decay)
    out = np.empty((n_kv, t, d), np.float32)
    q_shared = np.linalg.qr(rng.standard_normal((d, d)))[0]
    for h in range(n_kv):
        q = q_shared if shared_basis else np.linalg.qr(rng.standard_normal((d, d)))[0]
        mean = 0.0 if shared_basis else rng.standard_normal(d)
        out[h] = (rng.standard_normal((t, d)) * scales) @ q.T + mean
    return out


def rel_mse(x, y):
    return float(((x - y) ** 2).mean() / (x**2).mean())


# ---------------------------------------------------------------- parameters / registry


def test_presets_build_and_defaults():
    cfg = {"kakeyaturbo_v1_2": LEGACY, "kakeyaturbo": FIXED}
    legacy = build_codec("kakeyaturbo_v1_2", cfg)
    fixed = build_codec("kakeyaturbo", cfg)
    assert legacy.params["wht_scale"] == "legacy_sqrtN"
    assert legacy.params["ip_decode"] == "legacy_unscaled"
    p = fixed.params
    assert (p["block_size"], p["variance_ratio"], p["k"], p["bit_width"]) == (512, 0.95, 16, 3)
    assert p["rotation_seed"] == 3405691582 and p["kmeans_max_iter"] == 32
    assert (p["metric_k"], p["metric_v"], p["share_basis_v"], p["skeleton_dtype"]) == (
        "inner_product",
        "mse",
        True,
        "f16",
    )
    assert (p["wht_scale"], p["ip_decode"]) == ("fixed", "fixed")
    assert not fixed.compresses_sliding("k") and not fixed.compresses_sliding("v")


@pytest.mark.parametrize(
    "bad",
    [
        {"bit_width": 0},
        {"bit_width": 5},
        {"bit_width": 3.0},
        {"variance_ratio": 0.0},
        {"variance_ratio": 1.01},
        {"variance_ratio": -0.5},
        {"variance_ratio": float("nan")},
        {"variance_ratio": "0.9"},
        {"k": 0},
        {"block_size": 1},
        {"rotation_seed": -1},
        {"rotation_seed": 2**32 - 1},
        {"kmeans_max_iter": -1},
        {"wht_scale": "sqrtN"},
        {"ip_decode": "scaled"},
        {"metric_k": "cosine"},
        {"metric_v": "l2"},
        {"skeleton_dtype": "bf16"},
        {"share_basis_v": "yes"},
        {"no_such_param": 1},
    ],
)
def test_bad_params(bad):
    with pytest.raises(KvbenchError, match=next(iter(bad))):
        codec(**bad)


def test_bad_stream_and_shape():
    c = codec()
    with pytest.raises(KvbenchError):
        c.encode(np.zeros((1, 512, 8), np.float32), stream="q")
    with pytest.raises(KvbenchError):
        c.encode(np.zeros((512, 8), np.float32))


# ---------------------------------------------------------------- bytes (spec 2.9 / 2.11)


def test_code_bytes_spec_table():
    # b=3, wht_len 1..512 -> packed 1,1,2,3,6,12,24,48,96,192 (+10 B fixed overhead)
    packed = [kt.kt_code_nbytes(w, 3) - 10 for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    assert packed == [1, 1, 2, 3, 6, 12, 24, 48, 96, 192]
    assert kt.kt_code_nbytes(108, 3) == 58  # Qwen3 8k L0 V (wht_len 128) and Gemma L4 V (71)
    assert kt.kt_code_nbytes(71, 3) == 58


def test_legacy_formula_spec_integers():
    # Qwen3 8k KT1.2 layer 0 V: shared d_eff 108, D 128: shared PCA 27,904 B, centres 3,456 B/block
    one = kt.kt_legacy_stream_bytes(128, [], [16], 512, 3, shared_d_eff=108)
    assert one["skeleton"] == 27_904 + 3_456
    assert one["codes"] == 512 * 58
    two = kt.kt_legacy_stream_bytes(128, [], [16, 16], 512, 3, shared_d_eff=108)
    assert two["skeleton"] == 27_904 + 2 * 3_456  # shared PCA counted once
    # Gemma 8k layer 4 V: D 512, shared d_eff 71 -> 73,728 B
    g = kt.kt_legacy_stream_bytes(512, [], [16], 512, 3, shared_d_eff=71)
    assert g["skeleton"] - 2 * 16 * 71 == 73_728
    # per-block (K) KT1.2 vs KT1.0 (f32 skeleton doubles it); driver tail = tail_rows * D
    k12 = kt.kt_legacy_stream_bytes(128, [10, 4], [16, 16], 512, 3, tail_rows=7)
    k10 = kt.kt_legacy_stream_bytes(128, [10, 4], [16, 16], 512, 3, skeleton_bytes=4, tail_rows=7)
    assert k12["skeleton"] == 2 * (128 + 10 * 128 + 160) + 2 * (128 + 4 * 128 + 64)
    assert k10["skeleton"] == 2 * k12["skeleton"]
    assert k12["codes"] == 512 * (10 + 6) + 512 * (10 + 2)
    assert k12["tail"] == 7 * 128 and k12["total"] == k12["skeleton"] + k12["codes"] + 7 * 128
    # deff-outlier ablation projected K ratios (Qwen3 L0 d_eff 10 at 0.95, 2 at 0.85)
    assert kt.estimate_k_ratio(128, 10, 0) == pytest.approx(256 / 22.125)
    assert round(kt.estimate_k_ratio(128, 10, 0), 3) == 11.571
    assert round(kt.estimate_k_ratio(128, 2, 4), 3) == 8.943


def exact_rank_blocks(n_blocks, bs, d, r, tail_rows, seed=0, shared=False):
    """Blocks of known rank r with r EQUAL eigenvalues (orthogonal +-1 Hadamard columns), so
    d_eff = r at vr 0.95 for r < 20; plus ``tail_rows`` extra rows. Head-major [1, T, D]."""
    rng = np.random.default_rng(seed)
    from kvbench.codecs.wht import hadamard

    h = hadamard(np, bs)[:, 1 : r + 1]  # zero-mean, mutually orthogonal columns
    q0 = np.linalg.qr(rng.standard_normal((d, r)))[0]
    mean0 = rng.standard_normal(d)
    rows = []
    for _ in range(n_blocks):
        q = q0 if shared else np.linalg.qr(rng.standard_normal((d, r)))[0]
        mean = mean0 if shared else rng.standard_normal(d)
        rows.append(h @ q.T * 0.5 + mean)
    rows.append(rng.standard_normal((tail_rows, d)))
    return np.concatenate(rows).astype(np.float32)[None]


@pytest.mark.parametrize("stream", ["k", "v"])
def test_bytes_end_to_end_known_rank(stream):
    d, r, nb, tail = 64, 10, 4, 100
    x = exact_rank_blocks(nb, 512, d, r, tail, shared=(stream == "v"))
    for spec in (LEGACY, FIXED):
        c = build_from_spec("kt", spec)
        enc = c.encode(x, stream)
        assert enc.meta["d_eff"].tolist() == [r] * nb
        assert enc.meta["k_eff"].tolist() == [16] * nb
        assert enc.meta["wht_len"].tolist() == [16] * nb
        # the study's own accounting (Rust JSON + driver tail), here written out by hand
        per_block = nb * 2 * (d + r * d + 16 * r)
        shared = 2 * (d + r * d) + nb * 2 * 16 * r
        skel = per_block if stream == "k" else shared
        legacy = c.legacy_nbytes(enc)
        assert legacy["legacy_kt_skeleton_bytes"] == skel
        assert legacy["legacy_kt_codes_bytes"] == nb * 512 * (4 + 6 + 6)
        assert legacy["legacy_kt_tail_bytes"] == tail * d
        assert legacy["legacy_kt_bytes"] == skel + nb * 512 * 16 + tail * d
        # exact bytes: + u16 d_eff per fit, u8 K_eff per block; no u32 seg/alpha; 4-bit seg ids
        n_fits = nb if stream == "k" else 1
        nbytes = c.nbytes(enc)
        assert nbytes["skeleton"] == skel + 2 * n_fits + nb
        assert nbytes["codes"] == nb * 512 * (6 + 2) + nb * 512 * 4 // 8
        norm_used = stream == "v" or spec is FIXED
        assert nbytes["norms"] == (nb * 512 * 2 if norm_used else 0)
        assert nbytes["tail"] == 2 * tail * d
        assert nbytes.get("passthrough", 0) == 0


def test_f32_skeleton_bytes():
    x = exact_rank_blocks(2, 512, 32, 8, 0)
    e16 = codec(skeleton_dtype="f16").encode(x, "k")
    e32 = codec(skeleton_dtype="f32").encode(x, "k")
    l16 = codec().legacy_nbytes(e16)["legacy_kt_skeleton_bytes"]
    l32 = codec(skeleton_dtype="f32").legacy_nbytes(e32)["legacy_kt_skeleton_bytes"]
    assert l32 == 2 * l16
    assert e32.arrays["basis"].dtype == np.float32 and e16.arrays["basis"].dtype == np.float16


# ---------------------------------------------------------------- round trip


def test_error_decreases_with_bit_width():
    x = lowrank(2, 1024, 32, decay=8.0, seed=1)
    for stream in ("k", "v"):
        errs = []
        for b in (1, 2, 3, 4):
            c = codec(bit_width=b)
            errs.append(rel_mse(x, c.decode(c.encode(x, stream))))
        assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), (stream, errs)


def test_error_decreases_with_variance_ratio():
    x = lowrank(2, 1024, 32, decay=8.0, seed=2)
    for stream in ("k", "v"):
        errs, deffs = [], []
        for vr in (0.7, 0.85, 0.95, 0.995):
            c = codec(variance_ratio=vr)
            enc = c.encode(x, stream)
            deffs.append(int(enc.meta["d_eff"].max()))
            errs.append(rel_mse(x, c.decode(enc)))
        assert deffs == sorted(deffs) and deffs[0] < deffs[-1]
        assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), (stream, errs)


def test_pca_basis_orthonormal_and_centres_unit():
    x = lowrank(2, 1024, 32, seed=3)
    for sd, tol in (("f16", 3e-3), ("f32", 1e-5)):
        c = codec(skeleton_dtype=sd)
        enc = c.encode(x, "k")
        basis = enc.arrays["basis"].astype(np.float32)
        for b, de in enumerate(enc.meta["d_eff"]):
            bb = basis[b, :de]
            np.testing.assert_allclose(bb @ bb.T, np.eye(de), atol=tol)
            assert not basis[b, de:].any()
            cen = enc.arrays["centres"].astype(np.float32)[b, : enc.meta["k_eff"][b], :de]
            np.testing.assert_allclose(np.linalg.norm(cen, axis=1), 1.0, atol=tol)


def test_deterministic():
    x = lowrank(2, 1024, 32, seed=4)
    for stream in ("k", "v"):
        e1, e2 = codec().encode(x, stream), codec().encode(x, stream)
        assert e1.arrays.keys() == e2.arrays.keys()
        for key in e1.arrays:
            assert np.array_equal(e1.arrays[key], e2.arrays[key]), key
        assert np.array_equal(codec().decode(e1), codec().decode(e2))


def test_tail_rows_and_tiny_inputs():
    x = lowrank(2, 700, 16, seed=5)  # 1400 rows = 2 blocks + 376 tail rows (head-major)
    c = codec()
    enc = c.encode(x, "k")
    assert enc.meta["n_blocks"] == 2 and enc.meta["tail_rows"] == 376
    y = c.decode(enc)
    assert y.shape == x.shape and y.dtype == np.float32
    flat, yflat = x.reshape(-1, 16), y.reshape(-1, 16)
    assert np.array_equal(yflat[1024:], bf16_round(np, flat[1024:]))
    # fewer rows than one block: everything is tail
    small = x[:1, :100]
    e = c.encode(small, "v")
    assert c.nbytes(e) == {"skeleton": 0, "codes": 0, "norms": 0, "tail": 2 * 100 * 16}
    assert c.legacy_nbytes(e)["legacy_kt_bytes"] == 100 * 16  # the driver's halved tail
    assert np.array_equal(c.decode(e), bf16_round(np, small))
    # all-zero blocks: no NaN, exact zeros
    z = np.zeros((1, 1024, 8), np.float32)
    legacy = build_from_spec("l", LEGACY)
    for stream in ("k", "v"):
        ez = c.encode(z, stream)
        assert np.array_equal(c.decode(ez), z)
        assert ez.meta["k_eff"].tolist() == [1, 1]
        # Rust (legacy) decodes a zero residual to a small spurious one (stored norm 1 or unused)
        yl = legacy.decode(legacy.encode(z, stream))
        assert np.all(np.isfinite(yl)) and 0 < np.abs(yl).max() < 1


def test_mean_block_mse_matches_rust_definition():
    x = lowrank(2, 700, 16, seed=14)
    c = codec()
    y = c.decode(c.encode(x, "v"))
    flat, yflat = x.reshape(-1, 16), y.reshape(-1, 16)
    per_block = [((flat[i : i + 512] - yflat[i : i + 512]) ** 2).mean() for i in (0, 512)]
    assert kt.mean_block_mse(np, x, y) == pytest.approx(np.mean(per_block), rel=1e-6)
    assert np.isnan(kt.mean_block_mse(np, x[:, :100], x[:, :100]))


def test_mse_and_linf_are_the_same_codec():
    x = lowrank(1, 1024, 16, seed=6)
    a, b = codec(metric_v="mse"), codec(metric_v="linf")
    assert np.array_equal(a.decode(a.encode(x, "v")), b.decode(b.encode(x, "v")))


def test_first_kmeans_centre_is_rng_row():
    # spec 2.5 / 5.11: with 512 valid rows the first centre is row 377 (K seed) / 263 (V seed)
    c = np.random.default_rng(7).standard_normal((2, 512, 6)).astype(np.float32)
    for seed, row in ((0xCAFEBABE, 377), (0xCAFEBABF, 263)):
        centres, k_eff = kt.fit_spherical_kmeans(np, c, 16, seed, max_iter=0)
        assert k_eff.tolist() == [16, 16]
        want = c[:, row] / np.linalg.norm(c[:, row], axis=1, keepdims=True)
        np.testing.assert_allclose(centres[:, 0], want, rtol=1e-6)


# ---------------------------------------------------------------- legacy vs fixed (spec 5.7, 5.8)


def _true_residual(c, enc, x):
    """Exact coefficient-space residual r = c - t*centre_s of the full blocks (encoder side)."""
    bs, nb = enc.meta["block_size"], enc.meta["n_blocks"]
    blocks = x.reshape(-1, x.shape[-1])[: nb * bs].reshape(nb, bs, -1)
    mean = enc.arrays["mean"].astype(np.float32)
    basis = enc.arrays["basis"].astype(np.float32)
    coeffs = np.matmul(blocks - mean[:, None], basis.transpose(0, 2, 1))
    c_hat, r_hat = c.decode_coefficients(enc)
    return coeffs - (c_hat - r_hat), r_hat  # c_hat - r_hat = t * centre_s


def test_legacy_wht_scale_saturates():
    # V (mse): legacy sqrt(N) scale gives residual errors ~0.35 at wht_len 16 vs ~0.03 fixed
    x = lowrank(2, 1024, 64, decay=1e9, seed=8)[..., :64] * 0
    rng = np.random.default_rng(8)
    q = np.linalg.qr(rng.standard_normal((64, 16)))[0]
    x = ((rng.standard_normal((2, 1024, 16)) * np.linspace(1.0, 0.9, 16)) @ q.T).astype(np.float32)
    out = {}
    for scale in ("legacy_sqrtN", "fixed"):
        c = codec(wht_scale=scale, share_basis_v=False)
        enc = c.encode(x, "v")
        assert set(enc.meta["wht_len"].tolist()) == {16}
        r, r_hat = _true_residual(c, enc, x)
        out[scale] = float(((r - r_hat) ** 2).sum() / (r**2).sum())
        out[scale + "_x"] = rel_mse(x, c.decode(enc))
    assert 0.2 < out["legacy_sqrtN"] < 0.5, out
    assert out["fixed"] < 0.06, out
    assert out["legacy_sqrtN_x"] > 3 * out["fixed_x"], out


@pytest.mark.parametrize("amp", [0.01, 100.0])
def test_legacy_ip_decode_fixed_norm(amp):
    # K (inner_product) legacy_unscaled: decoded residual norm ~2 (legacy scale) or ~1 (fixed
    # scale) whatever the true residual norm; ip_decode fixed tracks the true norm.
    x = (lowrank(2, 1024, 32, decay=8.0, seed=9) * amp).astype(np.float32)
    norms = {}
    for scale in ("legacy_sqrtN", "fixed"):
        for ip in ("legacy_unscaled", "fixed"):
            c = codec(wht_scale=scale, ip_decode=ip)
            enc = c.encode(x, "k")
            r, r_hat = _true_residual(c, enc, x)
            norms[scale, ip] = (
                float(np.linalg.norm(r_hat, axis=-1).mean()),
                float(np.linalg.norm(r, axis=-1).mean()),
            )
    assert 1.5 < norms["legacy_sqrtN", "legacy_unscaled"][0] < 2.5, norms
    assert 0.8 < norms["fixed", "legacy_unscaled"][0] < 1.2, norms
    true = norms["fixed", "fixed"][1]
    assert norms["fixed", "fixed"][0] == pytest.approx(true, rel=0.1)
    assert norms["legacy_sqrtN", "fixed"][0] < 0.7 * true  # legacy scale shrinks the residual


def test_ip_fixed_is_scale_equivariant_legacy_is_not():
    x = lowrank(2, 1024, 32, decay=8.0, seed=10)
    fixed, legacy = build_from_spec("a", FIXED), build_from_spec("b", LEGACY)
    e_small = rel_mse(x * 0.01, fixed.decode(fixed.encode(x * 0.01, "k")))
    e_big = rel_mse(x, fixed.decode(fixed.encode(x, "k")))
    assert e_small == pytest.approx(e_big, rel=0.05)
    l_small = rel_mse(x * 0.01, legacy.decode(legacy.encode(x * 0.01, "k")))
    assert l_small > 100 * e_small


# ---------------------------------------------------------------- batched == per-block reference


def _ref_pca(x, vr):
    """Spec 2.4 on one ``[n, D]`` matrix, Rust loop order (f32 running sums)."""
    eps = np.float32(np.finfo(np.float32).eps)
    d = x.shape[1]
    mu, lam, vec = kt._mean_cov_eigh(np, x[None])  # the codec's mean, covariance + eigh backend
    mu = mu[0]
    lam, vec = lam[0][::-1], vec[0][:, ::-1].copy()
    for j in range(d):  # canonical sign (largest-|.| component positive)
        if vec[np.argmax(np.abs(vec[:, j])), j] < 0:
            vec[:, j] = -vec[:, j]
    total = np.float32(0)
    for v in lam:
        total += np.float32(max(v, 0))
    d_eff, cum = d, np.float32(0)
    if total > eps:
        for i, v in enumerate(lam):
            cum += np.float32(max(v, 0))
            if cum / total >= np.float32(vr):
                d_eff = i + 1
                break
    else:
        d_eff = 1
    mean = mu.astype(np.float16).astype(np.float32)
    basis = vec[:, :d_eff].T.astype(np.float16).astype(np.float32)
    return mean, basis, d_eff


def _ref_code_block(x, mean, basis, *, k, bits, seed, max_iter, wht_scale, norm_used):
    """Spec 2.5-2.7 for one block, literally per row (Rust loop order)."""
    from kvbench.codecs.rng import first_gen_range

    eps = np.float32(np.finfo(np.float32).eps)
    n = x.shape[0]
    d_eff = basis.shape[0]
    coeffs = (x - mean) @ basis.T
    valid = [i for i in range(n) if np.linalg.norm(coeffs[i]) > eps]
    dirs = np.array([coeffs[i] / np.linalg.norm(coeffs[i]) for i in valid], np.float32)
    n_any = sum(1 for i in range(n) if np.any(np.abs(coeffs[i]) > eps))
    k_eff = min(k, max(n_any, 1))
    cents = [dirs[first_gen_range(seed, len(valid))]]
    for _ in range(1, k_eff):  # farthest-first on signed cosine, strict >, first wins
        best, best_d = 0, -np.inf
        for i in range(len(dirs)):
            dist = np.float32(1) - max(float(dirs[i] @ c) for c in cents)
            if dist > best_d:
                best, best_d = i, dist
        cents.append(dirs[best])
    cents = np.array(cents, np.float32)
    assign = np.zeros(len(dirs), int)
    for _ in range(max_iter):
        changed = False
        for i in range(len(dirs)):
            b = int(np.argmax(np.abs(cents @ dirs[i])))
            if b != assign[i]:
                changed, assign[i] = True, b
        if not changed:
            break
        new = np.zeros_like(cents)
        cnt = np.zeros(k_eff)
        for i in range(len(dirs)):
            c = assign[i]
            cnt[c] += 1
            new[c] += (1.0 if dirs[i] @ cents[c] >= 0 else -1.0) * dirs[i]
        for c in range(k_eff):
            nn = np.linalg.norm(new[c])
            if cnt[c] > eps:
                cents[c] = new[c] / nn if nn > eps else new[c]
    cents_r = cents.astype(np.float16).astype(np.float32)

    w = next_pow2(d_eff)
    sig = sign_pattern(seed, w).astype(np.float32)
    table = np.asarray(KT_LLOYD_MAX[bits], np.float32)
    out = np.empty_like(x)
    segs, codes = [], []
    for i in range(n):
        ci = coeffs[i]
        if float(ci @ ci) <= eps:
            s, t = 0, np.float32(0)
        else:
            proj = cents_r @ ci
            s = int(np.argmax(np.abs(proj)))
            t = proj[s]
        res = np.zeros(d_eff, np.float32) if np.all(np.abs(ci) <= eps) else ci - t * cents_r[s]
        rot = fwht(np, sig * np.pad(res, (0, w - d_eff)))
        rn = np.linalg.norm(res)
        num = np.sqrt(np.float32(w)) if wht_scale == "legacy_sqrtN" else np.float32(1)
        scale = num / rn if rn > eps else np.float32(1)
        q = np.argmin((rot * scale - table[:, None]) ** 2, axis=0)
        inv = np.float16(1 / max(scale, eps)).astype(np.float32) if norm_used else 1.0
        u = sig * fwht(np, table[q] * inv) / w
        c_hat = np.float16(t).astype(np.float32) * cents_r[s] + u[:d_eff]
        out[i] = mean + c_hat @ basis
        segs.append(s)
        codes.append(q)
    return out, d_eff, np.array(segs), np.array(codes)


@pytest.mark.parametrize(
    "stream,params",
    [
        ("k", {"wht_scale": "legacy_sqrtN", "ip_decode": "legacy_unscaled"}),
        ("k", {"wht_scale": "fixed", "ip_decode": "fixed"}),
        ("v", {"wht_scale": "legacy_sqrtN", "share_basis_v": False}),
        ("v", {"wht_scale": "fixed", "share_basis_v": True}),
    ],
)
def test_batched_equals_per_block_reference(stream, params):
    from kvbench.codecs.wht import unpack_bits

    bs, d, nb = 64, 12, 6
    rng = np.random.default_rng(11)
    # blocks with different spectra -> different d_eff, wht_len and K-means convergence
    blocks = []
    for b in range(nb):
        q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        sc = np.exp(-np.arange(d) / (0.7 + b))
        blocks.append((rng.standard_normal((bs, d)) * sc) @ q.T + rng.standard_normal(d))
    x = np.concatenate(blocks).astype(np.float32).reshape(2, nb // 2 * bs, d)
    c = codec(block_size=bs, k=4, **params)
    enc = c.encode(x, stream)
    got = c.decode(enc).reshape(-1, d)
    seed = c.params["rotation_seed"] + (stream == "v")
    norm_used = stream == "v" or params["ip_decode"] == "fixed"
    shared = stream == "v" and params["share_basis_v"]
    if shared:
        shared_fit = _ref_pca(x.reshape(-1, d), 0.95)
    else:
        assert len(set(enc.meta["d_eff"].tolist())) > 2  # the padding path is exercised
    seg_b = unpack_bits(np, enc.arrays["seg_packed"], enc.meta["seg_bits"], bs)
    q_b = unpack_bits(np, enc.arrays["res_packed"], 3, enc.meta["wht_pad"])
    for b in range(nb):
        xb = x.reshape(-1, d)[b * bs : (b + 1) * bs]
        mean, basis, d_eff = shared_fit if shared else _ref_pca(xb, 0.95)
        ref, d_eff, segs, codes = _ref_code_block(
            xb,
            mean,
            basis,
            k=4,
            bits=3,
            seed=seed,
            max_iter=32,
            wht_scale=params["wht_scale"],
            norm_used=norm_used,
        )
        assert enc.meta["d_eff"][b] == d_eff
        w = next_pow2(d_eff)
        np.testing.assert_array_equal(seg_b[b], segs)
        np.testing.assert_array_equal(q_b[b, :, :w], codes)
        assert not q_b[b, :, w:].any()  # codes beyond a block's wht_len are zero padding
        np.testing.assert_allclose(got[b * bs : (b + 1) * bs], ref, rtol=1e-5, atol=1e-5)


def test_batched_equals_codec_run_per_block():
    # the same codec on each block alone (n_full = 1) gives the same codes as the batched run
    x = lowrank(3, 1024, 16, decay=3.0, seed=12)
    c = codec()
    enc = c.encode(x, "k")
    y = c.decode(enc).reshape(-1, 512, 16)
    for b, blk in enumerate(x.reshape(-1, 512, 16)):
        e1 = c.encode(blk[None], "k")
        assert e1.meta["d_eff"][0] == enc.meta["d_eff"][b]
        assert np.array_equal(e1.arrays["seg_packed"][0], enc.arrays["seg_packed"][b])
        w = kt.packed_nbytes(enc.meta["wht_len"][b], 3)
        same = np.mean(
            np.all(e1.arrays["res_packed"][0, :, :w] == enc.arrays["res_packed"][b, :, :w], axis=-1)
        )
        assert same >= 0.99
        np.testing.assert_allclose(c.decode(e1)[0], y[b], atol=1e-3 * np.abs(blk).max())


# ---------------------------------------------------------------- CPU (numpy) vs GPU (cupy)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [FIXED, LEGACY], ids=["fixed", "legacy"])
def test_cupy_matches_numpy(cp, spec):
    x = lowrank(4, 2048, 64, decay=6.0, seed=13)
    cn, cg = build_from_spec("n", spec, np), build_from_spec("g", spec, cp)
    for stream in ("k", "v"):
        en = cn.encode(x, stream)
        eg = cg.encode(cp.asarray(x), stream)
        yn, yg = cn.decode(en), cp.asnumpy(cg.decode(eg))
        # same d_eff / K_eff -> identical byte counts; eigenvector and f16 rounding differences
        # flip a few K-means / quantiser decisions, so errors agree statistically
        assert np.array_equal(en.meta["d_eff"], eg.meta["d_eff"])
        assert cn.nbytes(en) == cg.nbytes(eg)
        assert cn.legacy_nbytes(en) == cg.legacy_nbytes(eg)
        assert rel_mse(x, yg) == pytest.approx(rel_mse(x, yn), rel=0.01)
        same = np.mean(cp.asnumpy(eg.arrays["res_packed"]) == en.arrays["res_packed"])
        assert same > 0.9


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spec,shape",
    [
        ({}, (3, 1024, 64)),
        (dict(LEGACY), (3, 1024, 64)),
        ({"block_size": 100, "k": 5, "bit_width": 2, "skeleton_dtype": "f32"}, (2, 300, 16)),
        ({"block_size": 64, "k": 32, "bit_width": 4, "share_basis_v": False}, (2, 256, 32)),
        ({"block_size": 64, "k": 1, "bit_width": 1, "kmeans_max_iter": 0}, (1, 256, 16)),
    ],
)
def test_gpu_kernels_match_numpy_codes(cp, spec, shape):
    # kernels.kt_encode_blocks / kt_decode_blocks on the NumPy path's own fit and coefficients:
    # the same K-means decisions and codes (only float32 summation orders differ), and decoding
    # the NumPy encoding reproduces the NumPy decode to round-off
    from kvbench.codecs.gpu.kakeyaturbo import kt_decode_blocks, kt_encode_blocks, kt_pad

    x = lowrank(*shape, decay=4.0, seed=21)
    x[0, :40] = 0.0  # rows without a direction (invalid for K-means, zero residual)
    for stream in ("k", "v"):
        c = codec(**spec)
        p, cfg = c.params, c._stream_cfg(stream)
        bs = p["block_size"]
        blocks = x.reshape(-1, shape[-1])[: x.size // shape[-1] // bs * bs]
        blocks = blocks.reshape(-1, bs, shape[-1])
        src = blocks.reshape(1, -1, shape[-1]) if cfg["shared"] else blocks
        fit = kt.fit_pca(np, src, p["variance_ratio"], p["skeleton_dtype"])
        d_eff = np.broadcast_to(fit.d_eff, (blocks.shape[0],))
        wht = kt.next_pow2_array(d_eff)
        codes, seg, centres, k_eff = c._code_blocks(blocks, fit, wht, cfg)
        coef = kt.pca_project(np, src, fit).reshape(blocks.shape[0], bs, -1)
        dp, dp4 = fit.d_pad, kt_pad(fit.d_pad)
        coef4 = np.zeros(coef.shape[:2] + (dp4,), np.float32)
        coef4[..., :dp] = coef
        tabs = kt._kt_tables(cp, cfg["seed"], bs, next_pow2(dp), p["bit_width"])
        opts = c._kt_encode_options(cfg)
        norm_mode = opts["norm_mode"]
        out = kt_encode_blocks(
            cp,
            cp.asarray(coef4),
            tabs["first"],
            cp.asarray(d_eff.astype(np.int32)),
            tabs["signs"],
            tabs["mids"],
            **opts,
        )
        g = {k: cp.asnumpy(v) for k, v in out.items() if v is not None}
        assert np.array_equal(g["k_eff"], k_eff)
        assert np.mean(g["seg"] == seg) >= 0.99
        assert not g["centres"][..., dp:].any()
        np.testing.assert_allclose(g["centres"][..., :dp], centres, atol=1e-3)
        assert np.mean(g["packed"] == codes["res_packed"]) >= 0.99
        assert np.mean(g["t"] == codes["t"]) >= 0.95  # f16 of a float32 dot product
        if norm_mode:
            assert np.mean(g["norm"] == codes["norm"]) >= 0.95
        # decode: the NumPy encoding through the kernel
        enc = c.encode(x, stream)
        y = c.decode(enc).reshape(-1, shape[-1])[: blocks.size // shape[-1]]
        a = {k: cp.asarray(v) for k, v in enc.arrays.items()}
        got = cp.zeros(y.shape, dtype=cp.float32)
        kt_decode_blocks(
            cp,
            a["res_packed"],
            a["t"],
            a["norm"] if cfg["norm_used"] else None,
            a.get("seg_packed"),
            enc.meta["seg_bits"],
            a["centres"],
            a["basis"],
            a["mean"],
            cp.asarray(enc.meta["d_eff"].astype(np.int32)),
            tabs["signs"],
            tabs["table"],
            got,
        )
        assert np.linalg.norm(cp.asnumpy(got) - y) <= 1e-5 * np.linalg.norm(y)


@pytest.mark.gpu
def test_gpu_chunked_and_fallback_paths(cp, monkeypatch):
    # tiny chunks (several projection + kernel launches) and a block size the kernels do not
    # take (the array path) give the same bytes and errors as one pass
    x = lowrank(2, 2048, 64, decay=5.0, seed=22)
    for params in ({}, {"block_size": 1024}):
        c = build_from_spec("g", {"family": "kakeyaturbo", **params}, cp)
        ref = {s: c.encode(cp.asarray(x), s) for s in ("k", "v")}
        monkeypatch.setattr(kt, "_chunk", lambda xp, n_items, item_bytes: max(1, n_items // 3))
        for s, e_ref in ref.items():
            e = c.encode(cp.asarray(x), s)
            assert c.nbytes(e) == c.nbytes(e_ref)
            y, y_ref = cp.asnumpy(c.decode(e)), cp.asnumpy(c.decode(e_ref))
            assert rel_mse(x, y) == pytest.approx(rel_mse(x, y_ref), rel=0.01)
        monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5, 300, 32), (1, 2000, 16), (3, 100, 48), (2, 512, 128)])
def test_gpu_mean_gram(cp, shape, monkeypatch):
    # kt_block_gram through _mean_gram: per-entry and pooled (512-row runs recombined), also in
    # chunks, against a float64 reference
    rng = np.random.default_rng(23)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=1, keepdims=True)
    g_ref = np.einsum("pni,pnj->pij", xc, xc)
    for chunked in (False, True):
        if chunked:
            monkeypatch.setattr(kt, "_chunk", lambda xp, n_items, item_bytes: min(n_items, 700))
        mu, g = (cp.asnumpy(a) for a in kt._mean_gram(cp, cp.asarray(x)))
        np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=1), atol=1e-5)
        assert np.abs(g - g_ref).max() <= 1e-5 * np.abs(g_ref).max()


@pytest.mark.gpu
def test_gpu_d_eff_rule_matches_host(cp):
    from kvbench.codecs.gpu.kakeyaturbo import kt_d_eff

    rng = np.random.default_rng(24)
    w = np.sort(rng.standard_normal((4000, 64)).astype(np.float32) ** 3, axis=1)  # some < 0
    w[0], w[1] = 0.0, 1e-9  # total <= EPS -> 1
    w[2] = np.float32(0.25)  # ties on the cumulative ratio
    for vr in (0.95, 0.5, 1.0):
        want = kt._d_eff_from_eigvals(w[:, ::-1], vr)
        np.testing.assert_array_equal(cp.asnumpy(kt_d_eff(cp, cp.asarray(w), vr)), want)


def test_first_table_is_gen_range():
    from kvbench.codecs.rng import first_gen_range

    t = kt._first_table(0xCAFEBABE, 512)
    assert t[0] == 0 and t[512] == 377 and t[4] == first_gen_range(0xCAFEBABE, 4)
    assert kt._first_table(0xCAFEBABF, 512)[512] == 263
