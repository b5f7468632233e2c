"""KV1 Kakeya codec: spec byte integers, batching vs a per-block reference, round trips, errors."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import ar1_kv, kv1_directions

from kvbench.codecs import kakeya
from kvbench.codecs.base import bf16_round, build_codec, build_from_spec
from kvbench.codecs.kakeya import (
    Kakeya,
    kv1_f32_block_bytes,
    packed_block_bytes,
    spherical_kmeans,
)
from kvbench.codecs.linalg import batched_gram
from kvbench.errors import KvbenchError

V1 = {"family": "kakeya", "pool_heads": True, "tdir_mode": "legacy_noise", "store": "f32"}
CONFIG = {"kakeya_v1": V1, "kakeya": {"family": "kakeya"}}


def codec(**params):
    return build_from_spec("t", {"family": "kakeya", **params})


# ----------------------------------------------------------------------------------------------
# synthetic data


def rank_block(rng, n, d, d_eff, scale=1.0):
    """[n, d] rows whose PCA at variance_ratio 0.95 has exactly ``d_eff`` components.

    The centred rows have M equal singular values (rank M), so the cumulative share is i/M and
    d_eff = ceil(0.95 M); M is chosen so that 0.95 M sits well inside (d_eff - 1, d_eff]. The
    column space of the left factor is orthogonal to the all-ones vector, so the rows are exactly
    centred before the mean offset is added.
    """
    m = int(round((d_eff - 0.5) / 0.95))
    assert int(np.ceil(0.95 * m)) == d_eff and m <= min(n - 1, d)
    z = rng.standard_normal((n, m + 1))
    u = np.linalg.qr(z - z.mean(axis=0))[0][:, :m]
    v = np.linalg.qr(rng.standard_normal((d, m)))[0]
    mu = rng.standard_normal(d)
    return (u @ v.T * scale * np.sqrt(n) + mu).astype(np.float32)


def pooled_stream(blocks, n_kv, tail_tokens, rng):
    """Lay pooled blocks [n_kv*B, D] out as [n_kv, T, D] (head-major rows, spec §1.2)."""
    B = blocks[0].shape[0] // n_kv
    D = blocks[0].shape[1]
    parts = [b.reshape(n_kv, B, D) for b in blocks]
    parts.append(rng.standard_normal((n_kv, tail_tokens, D)).astype(np.float32))
    return np.concatenate(parts, axis=1)


def clustered(rng, n_kv, T, D, sigma=(3.0, 2.0, 1.4, 1.0), noise=0.02):
    """Rows whose PCA axes have distinct variances and whose perpendicular part has 6 clusters.

    Coefficients: a0 ~ N(0, sigma0^2) (the first principal axis); one of the axes 1..3 carries
    +-sigma_j (1 + 5% noise), the others small noise. Mapped to D dims by a random orthonormal
    map, plus a per-head mean and tiny isotropic noise.
    """
    m = len(sigma)
    a = noise * rng.standard_normal((n_kv, T, m))
    a[..., 0] = sigma[0] * rng.standard_normal((n_kv, T))
    axis = rng.integers(1, m, size=(n_kv, T))
    sign = rng.choice([-1.0, 1.0], size=(n_kv, T))
    mag = np.asarray(sigma)[axis] * (1 + 0.05 * rng.standard_normal((n_kv, T)))
    np.put_along_axis(a, axis[..., None], (sign * mag)[..., None], axis=2)
    q = np.linalg.qr(rng.standard_normal((D, D)))[0][:m]
    mu = 2.0 * rng.standard_normal((n_kv, 1, D))
    x = a @ q + mu + 0.002 * rng.standard_normal((n_kv, T, D))
    return x.astype(np.float32)


def kv_like(rng, n_kv, T, D):
    """Correlated rows with a decaying spectrum and a strong per-head mean (key-like)."""
    spec = (1.0 / (1 + np.arange(D))) ** 0.8
    mix = np.linalg.qr(rng.standard_normal((D, D)))[0]
    x = (rng.standard_normal((n_kv, T, D)) * spec) @ mix + rng.standard_normal((n_kv, 1, D))
    return bf16_round(np, x.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# per-block reference (straight transcription of spec §1.3-1.5, loops everywhere)


def ref_kmeans(dirs, K, max_iter):
    n = len(dirs)
    k_act = min(K, n)
    cents = [dirs[0]]
    for _ in range(1, k_act):
        maxcos = (dirs @ np.array(cents).T).max(axis=1)
        cents.append(dirs[int(np.argmin(maxcos))])
    C = np.array(cents, dtype=np.float32)
    assign = np.zeros(n, dtype=np.int64)
    iters = refills = 0
    for _ in range(max_iter):
        new = np.argmax(dirs @ C.T, axis=1)
        if (new == assign).all():
            break
        assign = new
        iters += 1
        refills += ref_update(dirs, C, assign)
    return C, assign, iters, refills


def ref_update(dirs, C, assign):
    """One centre update in place (spec §1.3 step 7); returns the refills that moved a centre."""
    refills = 0
    for k in range(len(C)):
        members = assign == k
        if members.any():
            m = dirs[members].mean(axis=0)
            C[k] = m / max(np.linalg.norm(m), 1e-8)
        else:
            far = int(np.argmin((dirs @ C.T).max(axis=1)))
            refills += int(np.abs(C[k] - dirs[far]).max() > 1e-3)
            C[k] = dirs[far]
            assign[far] = k
    return refills


def ref_block(X, p):
    """Fit + encode + decode one block [N, D]; returns a dict of what matters."""
    N, D = X.shape
    packed = p["store"] == "packed"
    mu = X.mean(axis=0)
    Xc = X - mu
    S = np.linalg.svd(Xc.astype(np.float64), compute_uv=False)
    _, _, Vt = np.linalg.svd(Xc.astype(np.float64), full_matrices=False)
    cum = np.cumsum(S**2) / max((S**2).sum(), 1e-8)
    hit = np.nonzero(cum >= p["variance_ratio"])[0]
    d = int(np.clip(hit[0] + 1 if len(hit) else len(S), 2, D))
    basis = Vt[:d].astype(np.float32)
    if packed:  # the packed store fits K-means in the stored (bf16) coefficient space
        mu, basis = bf16_round(np, mu), bf16_round(np, basis)
    A = (X - mu) @ basis.T
    tdir = None
    if p["tdir_mode"] == "first_pc":
        tdir = np.eye(d, dtype=np.float32)[0]
    P = A if tdir is None else A - np.outer(A @ tdir, tdir)
    nrm = np.linalg.norm(P, axis=1)
    valid = nrm > 1e-8
    C, _, iters, _ = ref_kmeans(P[valid] / nrm[valid, None], p["k_segments"], p["max_iter"])
    k_act = len(C)
    if packed:
        C = bf16_round(np, C)
    alpha = None
    if tdir is not None:
        alpha = A @ tdir
        if packed:
            alpha = bf16_round(np, alpha)
        P = A - np.outer(alpha, tdir)
    else:
        P = A
    nrm = np.linalg.norm(P, axis=1)
    Phat = np.where((nrm > 1e-8)[:, None], P / np.maximum(nrm, 1e-30)[:, None], 0.0)
    seg = np.argmax(Phat @ C.T, axis=1)
    t = np.einsum("nd,nd->n", P, C[seg])
    if packed:
        t = bf16_round(np, t.astype(np.float32))
    r = P - t[:, None] * C[seg]
    rp = min(p["d_res"], d)
    rhat = np.zeros_like(r)
    idx = np.sort(np.argsort(-np.abs(r), axis=1, kind="stable")[:, :rp], axis=1)
    vals = np.take_along_axis(r, idx, axis=1)
    if packed:
        vals = bf16_round(np, vals.astype(np.float32))
    np.put_along_axis(rhat, idx, vals, axis=1)
    Ahat = t[:, None] * C[seg] + rhat
    if tdir is not None:
        Ahat = Ahat + np.outer(alpha, tdir)
    return {
        "d_eff": d,
        "k_act": k_act,
        "iters": iters,
        "seg": seg,
        "idx": idx,
        "x_hat": Ahat @ basis + mu,
    }


def ref_stream(x, p):
    """Loop over blocks (and heads) exactly as the spec lays them out."""
    n_kv, T, D = x.shape
    B, R = p["block_size"], p["residual_length"]
    nb = max((T - R) // B, 0)
    out = x.copy()
    outs = []
    for b in range(nb):
        sl = slice(b * B, (b + 1) * B)
        if p["pool_heads"]:
            res = ref_block(x[:, sl].reshape(n_kv * B, D), p)
            out[:, sl] = res["x_hat"].reshape(n_kv, B, D)
            outs.append((b, res))
        else:
            for h in range(n_kv):
                res = ref_block(x[h, sl], p)
                out[h, sl] = res["x_hat"]
                outs.append((h * nb + b, res))
    out[:, nb * B :] = bf16_round(np, x[:, nb * B :])
    return out, [r for _, r in sorted(outs, key=lambda kv: kv[0])]


# ----------------------------------------------------------------------------------------------
# bytes: spec §1.6 integers


def test_f32_byte_formula_reproduces_gemma_layer4():
    # D=512, n_kv=1, 3 blocks x (K, V), sum d_eff = 560 across the 6 streams' blocks
    d_effs = [100, 90, 80, 110, 95, 85]
    assert sum(d_effs) == 560
    pairs = [kv1_f32_block_bytes(d, 512, 512, 16, 8) for d in d_effs]
    assert sum(s for s, _ in pairs) == 1_197_248 == 2116 * 560 + 6 * 2048
    assert sum(e for _, e in pairs) == 344_064 == 6 * 512 * 112


def test_f32_byte_formula_reproduces_qwen3_layer0():
    k = [kv1_f32_block_bytes(2, 4096, 128, 16, 8) for _ in range(3)]
    assert sum(s for s, _ in k) == 5_016
    assert sum(e for _, e in k) == 491_520 == 3 * 4096 * 40
    v = [kv1_f32_block_bytes(d, 4096, 128, 16, 8) for d in (100, 108, 116)]
    assert sum(s for s, _ in v) == 189_456
    assert sum(e for _, e in v) == 1_376_256 == 3 * 4096 * 112


def test_f32_byte_formula_without_temporal_direction():
    s, e = kv1_f32_block_bytes(20, 512, 64, 16, 8, tdir=False)
    assert s == 4 * (20 * 64 + 64 + 16 * 20)
    assert e == 512 * (8 + 4 + 12 * 8)


def test_packed_byte_formula():
    s, c = packed_block_bytes(20, 512, 64, 16, 8)
    assert s == 4 + 2 * (20 * 64 + 64 + 20 + 16 * 20)
    assert c == 512 * (1 + 2 + 2 + 8 * (2 + 1))
    # dense residual (d_eff <= d_res): the index list is implied, not stored
    assert packed_block_bytes(4, 512, 64, 16, 8)[1] == 512 * (1 + 2 + 2 + 4 * 2)
    # u16 indices above d_eff 256, u16 seg ids above 256 centres
    assert packed_block_bytes(300, 10, 512, 16, 8)[1] == 10 * (1 + 2 + 2 + 8 * 4)
    assert packed_block_bytes(300, 10, 512, 300, 8)[1] == 10 * (2 + 2 + 2 + 8 * 4)
    assert packed_block_bytes(20, 512, 64, 16, 8, tdir=False)[1] == 512 * (1 + 2 + 8 * 3)


def test_gemma_layer4_bytes_end_to_end():
    """D=512, n_kv=1, T=2048: 3 blocks + 512 tail tokens; d_eff forced by the data's rank."""
    rng = np.random.default_rng(4)
    c = build_codec("kakeya_v1", CONFIG)
    ranks = {"k": [100, 90, 80], "v": [110, 95, 85]}
    totals = {"skeleton": 0, "codes": 0, "tail": 0}
    legacy = 0
    for stream, rs in ranks.items():
        x = pooled_stream([rank_block(rng, 512, 512, r) for r in rs], 1, 512, rng)
        enc = c.encode(x, stream)
        assert enc.meta["d_eff"] == rs
        assert enc.meta["k_act"] == [16, 16, 16]
        nb = c.nbytes(enc)
        assert set(nb) <= {"skeleton", "codes", "norms", "tail", "passthrough"}
        for key in totals:
            totals[key] += nb[key]
        lg = c.legacy_nbytes(enc)
        assert lg["legacy_f32_store"] == sum(nb.values())
        assert lg["legacy_bf16_projection"] == nb["tail"] + (nb["skeleton"] + nb["codes"]) // 2
        legacy += lg["legacy_bf16_projection"]
    assert totals == {"skeleton": 1_197_248, "codes": 344_064, "tail": 1_048_576}
    assert 2 * (2 * 1 * 2048 * 512) == 4_194_304  # the baseline the ratios divide
    assert legacy == 1_048_576 + 1_197_248 // 2 + 344_064 // 2


def test_qwen3_layer0_bytes_end_to_end():
    """D=128, n_kv=8, pooled N=4096: K rank 2 in all 3 blocks, V mean d_eff 108."""
    rng = np.random.default_rng(0)
    c = build_codec("kakeya_v1", CONFIG)
    xk = pooled_stream([rank_block(rng, 4096, 128, 2, scale=5.0) for _ in range(3)], 8, 512, rng)
    ek = c.encode(xk, "k")
    assert ek.meta["d_eff"] == [2, 2, 2]
    nk = c.nbytes(ek)
    assert (nk["skeleton"], nk["codes"]) == (5_016, 491_520)
    xv = pooled_stream([rank_block(rng, 4096, 128, r) for r in (100, 108, 116)], 8, 512, rng)
    ev = c.encode(xv, "v")
    assert ev.meta["d_eff"] == [100, 108, 116]
    nv = c.nbytes(ev)
    assert (nv["skeleton"], nv["codes"]) == (189_456, 1_376_256)
    assert nk["tail"] == nv["tail"] == 8 * 512 * 128 * 2
    # with d_eff = 2 = r' the residual is exact: only the PCA truncation (none here) is lost
    assert np.abs(c.decode(ek)[:, :1536] - xk[:, :1536]).max() < 1e-3


def test_packed_bytes_and_legacy_columns():
    rng = np.random.default_rng(1)
    x = kv_like(rng, 2, 1024 + 300, 64)
    c = codec()
    enc = c.encode(x)
    nb = c.nbytes(enc)
    P = len(enc.meta["d_eff"])
    assert P == 2 * 2  # per head, 2 blocks
    want_s = want_c = want_s32 = want_c32 = 0
    for d, k in zip(enc.meta["d_eff"], enc.meta["k_act"], strict=True):
        s, cc = packed_block_bytes(d, 512, 64, k, 8)
        want_s, want_c = want_s + s, want_c + cc
        s, cc = kv1_f32_block_bytes(d, 512, 64, k, 8)
        want_s32, want_c32 = want_s32 + s, want_c32 + cc
    tail = 2 * 2 * (1324 - 1024) * 64
    assert nb == {"skeleton": want_s, "codes": want_c, "tail": tail}
    lg = c.legacy_nbytes(enc)
    assert lg["legacy_f32_store"] == want_s32 + want_c32 + tail
    assert lg["legacy_bf16_projection"] == tail + (want_s32 + want_c32) // 2
    assert sum(nb.values()) < lg["legacy_bf16_projection"] < lg["legacy_f32_store"]
    assert enc.arrays["seg"].dtype == np.uint8 and enc.arrays["res_idx"].dtype == np.uint8


# ----------------------------------------------------------------------------------------------
# batching == per-block reference


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("mode", ["first_pc", "none"])
@pytest.mark.parametrize("store", ["f32", "packed"])
def test_batched_matches_per_block_reference(pool, mode, store):
    rng = np.random.default_rng(7)
    x = clustered(rng, 2, 3 * 96 + 40, 16)
    p = {
        **Kakeya.DEFAULTS,
        "block_size": 96,
        "residual_length": 32,
        "variance_ratio": 0.999,
        "k_segments": 6,
        "d_res": 2,
        "pool_heads": pool,
        "tdir_mode": mode,
        "store": store,
    }
    c = codec(**{k: v for k, v in p.items() if k != "family"})
    enc = c.encode(x)
    y = c.decode(enc)
    y_ref, refs = ref_stream(x, p)
    assert enc.meta["d_eff"] == [r["d_eff"] for r in refs]
    assert enc.meta["k_act"] == [r["k_act"] for r in refs]
    assert enc.meta["kmeans_iters"] == [r["iters"] for r in refs]
    seg = enc.arrays["seg"].astype(np.int64)
    assert np.array_equal(seg, np.stack([r["seg"] for r in refs]))
    idx = enc.arrays["res_idx"].astype(np.int64)
    same = (idx == np.stack([r["idx"] for r in refs])).all(axis=2)
    assert same.mean() > 0.995
    # rows with the same residual coordinates decode to the same values
    rows = y.reshape(-1, 16)
    rows_ref = y_ref.reshape(-1, 16)
    err = np.abs(rows - rows_ref).max(axis=1)
    tol = 2e-4 if store == "f32" else 3e-2
    assert np.quantile(err, 0.99) < tol
    assert np.mean((y - y_ref) ** 2) < 1e-3 * np.mean((x - x.mean()) ** 2)
    assert np.array_equal(y[:, 3 * 96 :], bf16_round(np, x[:, 3 * 96 :]))


def test_blocks_are_independent_of_their_batch():
    """Per-head mode: encoding one head alone gives that head's codes of the full batch."""
    rng = np.random.default_rng(3)
    x = kv_like(rng, 3, 4 * 128 + 64, 32)
    c = codec(block_size=128, residual_length=64)
    full = c.encode(x)
    one = c.encode(x[1:2])
    nb = full.meta["n_blocks"]
    assert one.meta["d_eff"] == full.meta["d_eff"][nb : 2 * nb]
    assert one.meta["kmeans_iters"] == full.meta["kmeans_iters"][nb : 2 * nb]
    assert np.array_equal(one.arrays["seg"], full.arrays["seg"][nb : 2 * nb])
    np.testing.assert_allclose(c.decode(one)[0], c.decode(full)[1], atol=1e-3)


@pytest.mark.parametrize("chunks", ["single problems", "pairs across heads"])
@pytest.mark.parametrize(
    "params",
    [V1, {"family": "kakeya"}, {"family": "kakeya", "store": "f32", "pool_heads": True}],
    ids=["kakeya_v1", "kakeya", "pooled_f32"],
)
def test_chunked_encode_decode_is_identical(monkeypatch, chunks, params):
    """Chunks of one or two problems (the per-head layout's pairs straddle heads) give exactly
    the unchunked arrays, meta and decode: a constant block (random-centre fallback), a rank-2
    block and full blocks make the chunks' own d_max and K differ from the global ones."""
    rng = np.random.default_rng(21)
    B, D = 64, 16
    x = kv_like(rng, 3, 5 * B + 30, D)
    x[:, :B] = x[0, 0]
    x[:, B : 2 * B] = rng.standard_normal((3, B, 2)) @ rng.standard_normal((2, D)) + 0.5
    c = build_from_spec("c", {**params, "block_size": B, "residual_length": 16, "d_res": 4})
    full = c.encode(x, "v", layer=2)
    y_full = c.decode(full)
    if chunks == "single problems":
        monkeypatch.setattr(kakeya, "CHUNK_BYTES", 1)
    else:
        monkeypatch.setattr(
            kakeya, "chunk_ranges", lambda xp, n, per: [(s, min(s + 2, n)) for s in range(0, n, 2)]
        )
    part = c.encode(x, "v", layer=2)
    assert part.meta == full.meta
    assert part.meta["k_act"][0] == 1 and len(set(part.meta["d_eff"])) > 1
    assert part.arrays.keys() == full.arrays.keys()
    for key, arr in full.arrays.items():
        assert part.arrays[key].dtype == arr.dtype, key
        assert np.array_equal(part.arrays[key], arr), key
    assert np.array_equal(c.decode(part), y_full)


# ----------------------------------------------------------------------------------------------
# spherical K-means


def _kmeans_case(rng):
    """Problems with duplicated axis directions (exact arithmetic, empty clusters guaranteed),
    and random ones, different K_act and different convergence speed."""
    d, N = 5, 150
    eye = np.eye(d, dtype=np.float32)
    probs, valids, kacts = [], [], []
    for q in range(4):  # only 3 distinct directions but 6 centres: duplicates -> empty clusters
        U = eye[rng.integers(0, 3, size=N)]
        valid = np.ones(N, dtype=bool)
        valid[rng.integers(0, N, size=q)] = False
        U[~valid] = 0
        probs.append(U)
        valids.append(valid)
        kacts.append(6)
    for ka in (3, 8):
        U = rng.standard_normal((N, d)).astype(np.float32)
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        probs.append(U)
        valids.append(np.ones(N, dtype=bool))
        kacts.append(ka)
    return np.stack(probs), np.stack(valids), np.array(kacts)


def test_kmeans_matches_reference_including_empty_clusters():
    rng = np.random.default_rng(11)
    U, valid, k_act = _kmeans_case(rng)
    C, assign, iters = spherical_kmeans(np, U, valid, k_act, 100)
    for q in range(len(U)):
        Cr, ar, itr, _ = ref_kmeans(U[q][valid[q]], int(k_act[q]), 100)
        assert iters[q] == itr
        np.testing.assert_allclose(C[q, : k_act[q]], Cr, atol=1e-6)
        assert np.all(C[q, k_act[q] :] == 0)
        assert np.array_equal(assign[q][valid[q]], ar)
        if q < 4:  # duplicated centres: at least one cluster was emptied and refilled
            assert np.bincount(ar, minlength=k_act[q]).min() == 0 and itr == 100
    assert len(set(iters.tolist())) > 1  # problems converged at different iterations


def test_kmeans_empty_cluster_refill_moves_the_centre():
    """A rare natural case (2-D, 6 rows, 6 centres) where an emptied centre is refilled with a
    row other than its old value, and the assignment then oscillates until max_iter."""
    ang = np.radians([-37.2, 94.6, 100.4, 14.4, 172.13, 172.14])
    U = np.stack([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    Cr, ar, itr, refills = ref_kmeans(U, 7, 100)
    assert refills > 0 and itr == 100
    C, assign, iters = spherical_kmeans(np, U[None], np.ones((1, 6), bool), np.array([6]), 100)
    assert iters[0] == itr and np.array_equal(assign[0], ar)
    np.testing.assert_allclose(C[0], Cr, atol=1e-6)


def test_kmeans_two_cycle_ends_on_the_right_state():
    """Duplicated rows make the refill rule alternate between two states forever: the state at
    max_iter depends on its parity (the batched code detects the cycle and stops early)."""
    U = np.array(
        [
            [0.33572286, -0.7950694, -0.50512856],
            [0.33572286, -0.7950694, -0.50512856],
            [-0.65852785, 0.6970128, 0.28375047],
            [0.33572286, -0.7950694, -0.50512856],
        ],
        dtype=np.float32,
    )
    results = []
    for max_iter in (100, 101):
        Cr, ar, itr, _ = ref_kmeans(U, 6, max_iter)
        C, assign, iters = spherical_kmeans(np, U[None], np.ones((1, 4), bool), [4], max_iter)
        assert iters[0] == itr == max_iter and np.array_equal(assign[0], ar)
        np.testing.assert_array_equal(C[0], Cr)
        results.append(ar)
    assert not np.array_equal(*results)


def test_empty_cluster_refill_sees_the_partly_updated_centres():
    """Hand-made update step (exact cosines: axis rows): the refill of cluster 1 must see the
    already updated centre 0, and the refill of cluster 2 the just refilled centre 1."""
    dirs = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
    C_old = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    assign = np.array([0, 0, 3, 3])
    C_ref, a_ref = C_old.copy(), assign.copy()
    ref_update(dirs, C_ref, a_ref)
    h = np.float32(np.sqrt(0.5))
    np.testing.assert_array_equal(C_ref, [[h, h], [0, -1], [1, 0], [-1, 0]])
    np.testing.assert_array_equal(a_ref, [2, 0, 3, 1])
    UTe = np.concatenate([dirs.T, np.ones((1, 4), np.float32)])[None]
    onehot = (assign[None, :] == np.arange(4)[:, None]).astype(np.float32)
    se = (onehot @ UTe[0].T).astype(np.float64)[None]
    C, a, se_out = kakeya._empty_cluster_pass(
        np,
        UTe,
        np.ones((1, 4), bool),
        C_old[None],
        (C_old @ dirs.T)[None],
        se,
        assign[None],
        np.array([4]),
        None,
    )
    np.testing.assert_allclose(C[0], C_ref, atol=1e-7)
    np.testing.assert_array_equal(a[0], a_ref)
    np.testing.assert_array_equal(se_out[0, :, 2], np.bincount(a_ref, minlength=4))


def test_kmeans_max_iter_caps_iterations():
    rng = np.random.default_rng(2)
    U = rng.standard_normal((3, 200, 6)).astype(np.float32)
    U /= np.linalg.norm(U, axis=2, keepdims=True)
    _, _, iters = spherical_kmeans(np, U, np.ones((3, 200), bool), np.array([16, 16, 16]), 2)
    assert iters.max() <= 2


# ----------------------------------------------------------------------------------------------
# round trips and properties


def _rel_err(c, x):
    y = c.decode(c.encode(x))
    nb = c.encode(x).meta["n_blocks"] * c.params["block_size"]
    return float(np.mean((y[:, :nb] - x[:, :nb]) ** 2) / np.mean(x[:, :nb] ** 2))


def test_error_decreases_with_variance_ratio_and_d_res():
    rng = np.random.default_rng(5)
    x = kv_like(rng, 2, 512 + 64, 32)
    common = {"block_size": 256, "residual_length": 64}
    by_vr = [_rel_err(codec(variance_ratio=v, d_res=32, **common), x) for v in (0.8, 0.9, 0.99)]
    assert by_vr[0] > by_vr[1] > by_vr[2]
    by_dres = [_rel_err(codec(d_res=r, **common), x) for r in (0, 2, 8)]
    assert by_dres[0] > by_dres[1] > by_dres[2]


def test_basis_orthonormal_centres_unit_and_deterministic():
    rng = np.random.default_rng(6)
    x = kv_like(rng, 2, 3 * 256 + 100, 32)
    for spec in (V1, {"family": "kakeya", "store": "f32"}):
        c = build_from_spec("c", spec)
        c.params["block_size"], c.params["residual_length"] = 256, 64
        enc = c.encode(x)
        again = c.encode(x)
        for key in enc.arrays:
            assert np.array_equal(enc.arrays[key], again.arrays[key]), key
        assert enc.meta == again.meta
        for q, (d, k) in enumerate(zip(enc.meta["d_eff"], enc.meta["k_act"], strict=True)):
            b = enc.arrays["basis"][q]
            np.testing.assert_allclose(b[:d] @ b[:d].T, np.eye(d), atol=1e-5)
            assert np.all(b[d:] == 0)
            cn = np.linalg.norm(enc.arrays["centres"][q, :k], axis=1)
            np.testing.assert_allclose(cn, 1.0, atol=1e-5)
            tdir = enc.arrays["tdir"][q]
            np.testing.assert_allclose(np.linalg.norm(tdir), 1.0, atol=1e-5)
            assert np.all(tdir[d:] == 0)


def test_presets_run_and_pooling_changes_the_problem_layout():
    rng = np.random.default_rng(8)
    x = kv_like(rng, 3, 2048, 32)
    errs = {}
    for name in CONFIG:
        c = build_codec(name, CONFIG)
        assert c.compresses_sliding("k") is False
        enc = c.encode(x, "k", layer=3)
        assert enc.meta["n_blocks"] == 3 and enc.meta["tail_tokens"] == 512
        assert len(enc.meta["d_eff"]) == (3 if name == "kakeya_v1" else 9)
        y = c.decode(enc)
        assert y.shape == x.shape and y.dtype == np.float32
        errs[name] = float(np.mean((y - x) ** 2) / np.mean(x**2))
        assert errs[name] < 0.1
    assert "tdir" in build_codec("kakeya", CONFIG).encode(x).arrays
    assert "tdir" not in codec(tdir_mode="none").encode(x).arrays


def test_short_context_is_all_exact_tail():
    rng = np.random.default_rng(9)
    c = build_codec("kakeya", CONFIG)
    x = rng.standard_normal((2, 767, 16)).astype(np.float32)  # < R + B = 768
    enc = c.encode(x)
    assert enc.meta["n_blocks"] == 0
    assert np.array_equal(c.decode(enc), bf16_round(np, x))
    assert c.nbytes(enc) == {"skeleton": 0, "codes": 0, "tail": 2 * 767 * 16 * 2}
    assert c.legacy_nbytes(enc)["legacy_bf16_projection"] == 2 * 767 * 16 * 2


def test_d_eff_is_at_least_two():
    rng = np.random.default_rng(12)
    line = rng.standard_normal((2, 768 + 5, 1)) * rng.standard_normal(16) + 1.0
    enc = codec(pool_heads=True).encode(line.astype(np.float32))
    assert enc.meta["d_eff"] == [2]


def test_constant_block_uses_the_random_centre_fallback():
    x = np.tile(np.arange(16, dtype=np.float32), (1, 768 + 10, 1))
    c = codec()
    enc = c.encode(x)
    assert enc.meta["k_act"] == [1] and enc.meta["d_eff"] == [16]
    np.testing.assert_allclose(np.linalg.norm(enc.arrays["centres"][0, 0]), 1.0, atol=1e-2)
    np.testing.assert_allclose(c.decode(enc), x, atol=1e-6)
    assert np.array_equal(c.encode(x).arrays["centres"], enc.arrays["centres"])


# ----------------------------------------------------------------------------------------------
# parameter errors


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"variance_ratio": 0.0}, "variance_ratio"),
        ({"variance_ratio": 1.5}, "variance_ratio"),
        ({"d_res": -1}, "d_res"),
        ({"block_size": 4}, "block_size"),
        ({"block_size": 64, "min_rows": 65}, "block_size"),
        ({"store": "bf16"}, "store"),
        ({"tdir_mode": "mean"}, "tdir_mode"),
        ({"pool_heads": "yes"}, "pool_heads"),
        ({"k_segments": 0}, "k_segments"),
        ({"max_iter": 1.5}, "max_iter"),
        ({"nope": 1}, "nope"),
    ],
)
def test_bad_parameters_are_named(params, key):
    with pytest.raises(KvbenchError, match=key):
        codec(**params)


def test_bad_input_shape():
    with pytest.raises(KvbenchError, match=r"\[n_kv, T, D\]"):
        codec().encode(np.zeros((4, 16), np.float32))


# ----------------------------------------------------------------------------------------------
# GPU (CuPy) agrees with NumPy


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["kakeya", "kakeya_v1"])
def test_cupy_matches_numpy(cp, preset):
    rng = np.random.default_rng(10)
    x = kv_like(rng, 2, 4 * 512 + 256, 64)
    c_np = build_codec(preset, CONFIG)
    c_cp = build_codec(preset, CONFIG, xp=cp)
    e_np = c_np.encode(x)
    e_cp = c_cp.encode(cp.asarray(x))
    assert e_cp.meta["d_eff"] == e_np.meta["d_eff"]
    assert c_cp.nbytes(e_cp) == c_np.nbytes(e_np)
    assert c_cp.legacy_nbytes(e_cp) == c_np.legacy_nbytes(e_np)
    y_np = c_np.decode(e_np)
    y_cp = cp.asnumpy(c_cp.decode(e_cp))
    err_np = np.mean((y_np - x) ** 2)
    err_cp = np.mean((y_cp - x) ** 2)
    if preset == "kakeya":  # deterministic temporal direction: the same codes up to rounding
        seg_cp = cp.asnumpy(e_cp.arrays["seg"])
        assert (seg_cp == e_np.arrays["seg"]).mean() > 0.99
        assert np.mean((y_cp - y_np) ** 2) < 1e-3 * err_np
    else:  # legacy t_dir is round-off noise: only the statistics agree (spec §5.1)
        assert abs(err_cp - err_np) < 0.05 * err_np


@pytest.mark.gpu
def test_gpu_kmeans_kernel_matches_numpy(cp):
    """kakeya_kv1.kv1_kmeans (the whole Lloyd loop on the device) against NumPy's spherical_kmeans
    on KV-like directions (pooled problems of 1536 rows): the same assignments on >= 99.9% of
    the rows, the same iteration counts on >= 90% of the problems, and centres equal to float32
    round-off in the problems that agree; problems left out of ``live`` stay zero."""
    from kvbench.codecs.gpu import kakeya_kv1

    rng = np.random.default_rng(14)
    U, valid, k_act, d_eff = kv1_directions(ar1_kv(rng, 3, 24 * 512 + 256, 64), 512)
    P, N, d = U.shape
    assert d > 16 and P == 24
    C_np, a_np, it_np = spherical_kmeans(np, U, valid, k_act, 100)
    Ud = cp.zeros((P, N, -(-d // 4) * 4), dtype=cp.float32)
    Ud[:, :, :d] = cp.asarray(U)
    live = np.arange(P - 1)
    C, a, it = kakeya_kv1.kv1_kmeans(cp, Ud, cp.asarray(valid), live, k_act, d_eff, 16, 100)
    C, a = cp.asnumpy(C), cp.asnumpy(a)
    assert np.all(C[-1] == 0) and np.all(a[-1] == 0) and it[-1] == 0
    assert (a[live] == a_np[live]).mean() >= 0.999
    assert (it[live] == it_np[live]).mean() >= 0.9
    same = live[(a[live] == a_np[live]).all(axis=1)]
    np.testing.assert_allclose(C[same, :, :d], C_np[same], atol=1e-5)
    assert np.all(C[:, :, d:] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("with_tdir", [True, False])
def test_gpu_split_kernel(cp, with_tdir):
    """kv1_split (temporal split, row norms and unit rows in one pass) against the array ops it
    replaces; zero rows get a zero unit row. And the cuBLAS Gram against NumPy."""
    from kvbench.codecs.gpu import kakeya_kv1

    rng = np.random.default_rng(16)
    A = rng.standard_normal((5, 300, 44)).astype(np.float32)
    A[1, 7] = 0.0
    tdir = None
    if with_tdir:
        tdir = rng.standard_normal((5, 44)).astype(np.float32)
        tdir /= np.linalg.norm(tdir, axis=1, keepdims=True)
    t_d = None if tdir is None else cp.asarray(tdir)
    alpha, Pp, nrm, U = (
        None if v is None else cp.asnumpy(v)
        for v in kakeya_kv1.kv1_split(cp, cp.asarray(A), t_d, kakeya.EPS)
    )
    a_ref, P_ref = kakeya.split_temporal(np, A, tdir, "legacy_noise", False)
    if with_tdir:
        np.testing.assert_allclose(alpha, a_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(Pp, P_ref, rtol=1e-5, atol=1e-5)
    else:
        assert alpha is None and np.array_equal(Pp, A)
    n_ref = np.sqrt((Pp.astype(np.float64) ** 2).sum(axis=2))
    np.testing.assert_allclose(nrm, n_ref, rtol=1e-6)
    ok = nrm > kakeya.EPS
    assert not ok[1, 7] and np.all(U[1, 7] == 0.0)
    np.testing.assert_array_equal(U[ok], Pp[ok] * (np.float32(1.0) / nrm[ok])[:, None])
    g = cp.asnumpy(batched_gram(cp, cp.asarray(A)))
    np.testing.assert_allclose(g, A.transpose(0, 2, 1) @ A, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["kakeya", "kakeya_v1"])
def test_gpu_decode_kernel_matches_numpy(cp, preset):
    """kv1_decode (coefficient rows, basis product and mean in one pass, written to each row's
    place) decodes NumPy's encoding of both layouts (pooled heads, per head) to NumPy's rows up to
    float32 summation order."""
    import dataclasses

    rng = np.random.default_rng(17)
    x = kv_like(rng, 3, 3 * 512 + 300, 64)
    c_np, c_cp = build_codec(preset, CONFIG), build_codec(preset, CONFIG, xp=cp)
    e = c_np.encode(x)
    arrays = {k: cp.asarray(v) for k, v in e.arrays.items()}
    y = cp.asnumpy(c_cp.decode(dataclasses.replace(e, arrays=arrays)))
    np.testing.assert_allclose(y, c_np.decode(e), rtol=1e-5, atol=1e-5)
