"""TurboQuant+ codec: byte models, codebooks, reference MSE (spec turboquant.md 4.2), layouts."""

import math

import numpy as np
import pytest

from kvbench.codecs import lloyd_max, turboquant, wht
from kvbench.codecs.base import build_from_spec
from kvbench.errors import KvbenchError


def tq(**params):
    return build_from_spec("tq", {"family": "turboquant", **params})


def unit_rows(seed, n, d):
    x = np.random.default_rng(seed).standard_normal((1, n, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def keys_like(seed=0, shape=(2, 256, 128)):
    """Anisotropic rows with a dominant channel, as real keys have (never the codec's seed)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((shape[-1], shape[-1])).astype(np.float32) / np.sqrt(shape[-1])
    x = rng.standard_normal(shape).astype(np.float32) @ mix
    x[..., 0] += 3.0
    return x


def pair_bytes(codec, d, n=10, field=None):
    """Stored bytes (or a legacy field) of the K+V pair of ``n`` vectors of head_dim ``d``."""
    x = np.random.default_rng(1).standard_normal((1, n, d)).astype(np.float32)
    total = 0
    for s in ("k", "v"):
        enc = codec.encode(x, s)
        b = codec.legacy_nbytes(enc)[field] if field else sum(codec.nbytes(enc).values())
        total += b
    return total


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize(
    "hd, expected", [(64, (7.111, 4.923, 3.765)), (128, (7.529, 5.120, 3.879))]
)
@pytest.mark.parametrize("variant", ["prototype", "llamacpp"])
def test_legacy_norm_free_ratio_reproduces_the_harness(hd, expected, variant):
    n = 10
    for b, want in zip((2, 3, 4), expected, strict=True):
        codec = tq(bits=b, variant=variant)
        legacy = pair_bytes(codec, hd, n, "legacy_norm_free")
        assert legacy == n * (hd * b + 32 + hd * b) // 8
        baseline = 2 * 2 * n * hd
        assert round(baseline / legacy, 3) == want
        assert math.isclose(baseline / legacy, 16 * hd / (b * hd + 16))


@pytest.mark.parametrize("hd, ratios", [(64, (5.818, 4.267, 3.368)), (128, (6.737, 4.741, 3.657))])
def test_prototype_honest_bytes_count_every_norm(hd, ratios):
    """K: (b-1)-bit indices + 1 QJL bit + 2 fp32 norms; V: b-bit indices + 1 fp32 norm."""
    n = 10
    for b, want in zip((2, 3, 4), ratios, strict=True):
        codec = tq(bits=b)
        x = np.zeros((1, n, hd), np.float32)
        k = codec.nbytes(codec.encode(x, "k"))
        v = codec.nbytes(codec.encode(x, "v"))
        assert k == {"skeleton": 0, "codes": n * ((b - 1) * hd // 8 + hd // 8), "norms": n * 8}
        assert v == {"skeleton": 0, "codes": n * b * hd // 8, "norms": n * 4}
        honest = sum(k.values()) + sum(v.values())
        assert honest == n * (2 * b * hd + 96) // 8
        legacy = pair_bytes(codec, hd, n, "legacy_norm_free")
        assert honest > legacy
        assert round(2 * 2 * n * hd / honest, 3) == want
    # fp16 norms: 2*b*hd + 48 bits per pair
    assert pair_bytes(tq(bits=3, norm_dtype="float16"), hd, n) == n * (2 * 3 * hd + 48) // 8


@pytest.mark.parametrize(
    "hd, per_vector",
    [
        (128, {2: 34, 3: 50, 4: 68}),  # the fork's block layouts (turbo4 = qs[64] + 4 B header)
        (256, {2: 68, 3: 100, 4: 136}),  # two 128-groups
        (64, {2: 18, 3: 26, 4: 36}),  # one 64-group (CUDA GROUP_SIZE = 64 path)
        (96, {2: 34, 3: 50, 4: 68}),  # zero-padded to 128, padded width stored
    ],
)
def test_llamacpp_bytes_are_the_block_layout(hd, per_vector):
    n = 6
    for b, per in per_vector.items():
        codec = tq(bits=b, variant="llamacpp")
        for s in ("k", "v"):
            enc = codec.encode(keys_like(shape=(1, n, hd)), s)
            nb = codec.nbytes(enc)
            assert sum(nb.values()) == n * per
            assert nb["skeleton"] == 0
            assert nb["norms"] == n * -(-hd // 128) * (4 if b == 4 else 2)


@pytest.mark.parametrize("variant", ["prototype", "llamacpp"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("hd", [64, 96, 128])
def test_nbytes_equals_the_arrays_actually_stored(variant, bits, hd):
    codec = tq(bits=bits, variant=variant)
    x = keys_like(shape=(2, 5, hd))
    for s in ("k", "v"):
        enc = codec.encode(x, s)
        stored = sum(int(a.nbytes) for a in enc.arrays.values())
        assert sum(codec.nbytes(enc).values()) == stored


# ----------------------------------------------------------------------------- codebooks


def test_prototype_codebook_matches_measured_values():
    # spec 2.2: sqrt(d) * c, positive half, 100 Lloyd iterations (b=4 not converged)
    b3 = [0.245094, 0.756005, 1.343909, 2.151945]
    b4 = [0.126047, 0.381178, 0.645875, 0.928245, 1.239959, 1.600802, 2.052138, 2.717667]
    for d in (64, 128, 256):
        c3 = lloyd_max.prototype_centroids(3, d) * math.sqrt(d)
        c4 = lloyd_max.prototype_centroids(4, d) * math.sqrt(d)
        np.testing.assert_allclose(c3[4:], b3, atol=1.5e-6)
        np.testing.assert_allclose(c4[8:], b4, atol=1.5e-6)
        c1 = math.sqrt(2 / (math.pi * d))
        np.testing.assert_allclose(lloyd_max.prototype_centroids(1, d), [-c1, c1], rtol=1e-12)
        np.testing.assert_allclose(
            lloyd_max.prototype_centroids(2, d) * math.sqrt(d), [-1.51, -0.453, 0.453, 1.51]
        )


def test_converged_lloyd_max_and_equal_mass_tables():
    c4 = lloyd_max.lloyd_max_centroids(4, 1)
    assert abs(c4[-1] - 2.732590) < 2e-6 and abs(c4[8] - 0.128395) < 2e-6
    # spec 6.7: Gaussian Lloyd-Max at d=128 for 3 bits
    c3 = lloyd_max.lloyd_max_centroids(3, 128)
    assert abs(c3[4] - 0.021663) < 2e-6 and abs(c3[-1] - 0.190207) < 2e-6
    # the fork's turbo4 table = the zero-iteration equal-mass means (spec 6.6)
    np.testing.assert_allclose(
        lloyd_max.equal_mass_centroids(4, 128)[8:], turboquant.PRODUCTION_D128[4], atol=1e-6
    )
    assert abs(lloyd_max.equal_mass_centroids(4, 1)[-1] - 1.968) < 1e-3  # outer value 1.968 sigma


@pytest.mark.parametrize("kind", ["prototype", "lloyd_max", "production"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebooks_sorted_symmetric_and_scaled(kind, bits):
    c = turboquant.codebook(kind, bits, 128)
    assert c.shape == (2**bits,)
    assert np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-10)
    np.testing.assert_allclose(turboquant.codebook(kind, bits, 32), c * 2, rtol=1e-9)


def test_normal_helpers_without_scipy():
    for p in (1e-12, 1e-4, 0.025, 0.3, 0.5, 0.8, 0.975, 1 - 1e-9):
        x = lloyd_max.norm_ppf(p)
        back = lloyd_max.norm_cdf(x) if x <= 0 else 1 - lloyd_max.norm_sf(x)
        assert abs(back - p) <= 1e-14 * max(1, 1 / min(p, 1 - p)) + 1e-16
    assert abs(lloyd_max.norm_ppf(0.975) - 1.959963984540054) < 1e-13


# ----------------------------------------------------------------------------- reference MSE

# spec 4.2: total E||x - x_hat||^2 on unit vectors from default_rng(99), N = 2000
REF_PQ = {64: (0.1163, 0.0330, 0.00893), 128: (0.1189, 0.0340, 0.00919)}
REF_PROD = {64: (0.606, 0.1765, 0.0503), 128: (0.620, 0.1836, 0.0523)}


@pytest.mark.parametrize("d", [64, 128])
def test_reference_mse_within_5_percent(d):
    x = unit_rows(99, 2000, d)
    for i, b in enumerate((2, 3, 4)):
        codec = tq(bits=b)
        mse_v = float(((x - codec.decode(codec.encode(x, "v"))) ** 2).sum(-1).mean())
        mse_k = float(((x - codec.decode(codec.encode(x, "k"))) ** 2).sum(-1).mean())
        assert abs(mse_v / REF_PQ[d][i] - 1) < 0.05, (b, mse_v)  # V = PolarQuant(b)
        assert abs(mse_k / REF_PROD[d][i] - 1) < 0.05, (b, mse_k)  # K = PQ(b-1) + QJL


def test_qjl_inner_product_is_unbiased():
    """Single-side IP (spec 4.2, d=256): d*E[(<y,x> - <y,x_hat>)^2] = 0.182 at b=3, mean ~ 0."""
    d, n = 256, 2000
    rng = np.random.default_rng(456)
    x = rng.standard_normal((1, n, d))
    y = rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    codec = tq(bits=3)
    x_hat = codec.decode(codec.encode(x, "k"))[0]
    err = np.einsum("nd,nd->n", y, x[0]) - np.einsum("nd,nd->n", y, x_hat)
    assert abs(d * np.mean(err**2) / 0.182 - 1) < 0.15
    assert abs(err.mean()) < 3 * err.std() / np.sqrt(n)


def test_orthogonal_qjl_option_has_lower_error():
    x = unit_rows(7, 1000, 128)
    gauss = tq(bits=3)
    orth = tq(bits=3, qjl="orthogonal")
    e_g = ((x - gauss.decode(gauss.encode(x, "k"))) ** 2).sum(-1).mean()
    e_o = ((x - orth.decode(orth.encode(x, "k"))) ** 2).sum(-1).mean()
    assert abs(e_o / 0.0675 - 1) < 0.1  # spec 4.2: May prod MSE at d=128, b=3
    assert e_o < 0.5 * e_g


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("variant", ["prototype", "llamacpp"])
def test_error_decreases_with_bits_and_is_deterministic(variant):
    x = keys_like(shape=(2, 300, 128))
    for s in ("k", "v"):
        errs = []
        for b in (2, 3, 4):
            codec = tq(bits=b, variant=variant)
            enc = codec.encode(x, s)
            x_hat = codec.decode(enc)
            assert x_hat.shape == x.shape and x_hat.dtype == np.float32
            errs.append(float(((x - x_hat) ** 2).mean()))
            again = tq(bits=b, variant=variant).encode(x, s)
            for key, arr in enc.arrays.items():
                assert np.array_equal(arr, again.arrays[key])
        assert errs[0] > errs[1] > errs[2], (s, errs)


def test_norm_correction_changes_only_the_decode():
    x = keys_like(shape=(1, 64, 128))
    on, off = tq(bits=3), tq(bits=3, norm_correction=False)
    for s in ("k", "v"):
        a, b = on.encode(x, s), off.encode(x, s)
        for key in ("codes_lo", "norms"):
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
        assert not np.allclose(on.decode(a), off.decode(a))
    # spec 2.4: with correction the unit-vector reconstruction norm is closer to 1
    u = unit_rows(11, 500, 128)
    n_on = np.linalg.norm(on.decode(on.encode(u, "v")), axis=-1)
    n_off = np.linalg.norm(off.decode(off.encode(u, "v")), axis=-1)
    assert np.abs(n_on - 1).mean() < np.abs(n_off - 1).mean()


def test_k_and_v_use_their_own_paths():
    x = keys_like(shape=(1, 50, 64))
    codec = tq(bits=3)
    k, v = codec.encode(x, "k"), codec.encode(x, "v")
    assert "signs" in k.arrays and "rnorms" in k.arrays and "codes_hi" not in k.arrays  # 2+1 bit
    assert "signs" not in v.arrays and "codes_hi" in v.arrays  # 3-bit "2+1" planes
    llama = tq(bits=3, variant="llamacpp")
    assert llama.encode(x, "k").arrays.keys() == llama.encode(x, "v").arrays.keys()
    assert codec.compresses_sliding("k") and llama.compresses_sliding("v")


@pytest.mark.parametrize("variant", ["prototype", "llamacpp"])
def test_zero_vectors_decode_to_zero(variant):
    x = keys_like(shape=(1, 8, 128))
    x[0, 3] = 0
    codec = tq(bits=3, variant=variant)
    for s in ("k", "v"):
        out = codec.decode(codec.encode(x, s))
        assert np.all(out[0, 3] == 0) and np.isfinite(out).all()


def test_rotations_are_orthogonal_and_seeded():
    for seed in (42, 542, 7):
        pi = turboquant.haar_rotation(64, seed)
        np.testing.assert_allclose(pi @ pi.T, np.eye(64), atol=1e-10)
        assert np.linalg.slogdet(pi)[0] == 1
    assert not np.allclose(turboquant.haar_rotation(64, 42), turboquant.haar_rotation(64, 542))
    # QR with sign fix: first column of Q = G[:, 0] / ||G[:, 0]|| (R_00 > 0), first d^2 draws
    g = np.random.default_rng(42).standard_normal((64, 64))
    col0 = g[:, 0] / np.linalg.norm(g[:, 0])
    np.testing.assert_allclose(turboquant.haar_rotation(64, 42)[:, 0], col0, atol=1e-12)
    q, r = np.linalg.qr(g)  # the spec's definition: LAPACK QR, columns times sign(R_jj)
    np.testing.assert_allclose(turboquant._sign_fixed_q(g), q * np.sign(np.diag(r)), atol=1e-12)
    s = turboquant.qjl_matrix(64, 1042, "orthogonal")
    np.testing.assert_allclose(s @ s.T, np.eye(64), atol=1e-10)


def test_wht_rotation_orientation_matches_the_fork():
    """u @ M == s2 * FWHT(s1 * u) / sqrt(128), and M.T inverts it (spec 7: test R vs R^T)."""
    m = turboquant.wht_rotation(128, 42)
    s1, s2 = turboquant.wht_signs(128, 42)
    u = np.random.default_rng(3).standard_normal((5, 128))
    np.testing.assert_allclose(u @ m, s2 * wht.fwht(np, s1 * u) / math.sqrt(128), atol=1e-12)
    np.testing.assert_allclose(m @ m.T, np.eye(128), atol=1e-12)
    # s1, s2 = random_rotation_fast's draws: rng.choice([-1, 1], p) twice
    rng = np.random.default_rng(42)
    assert np.array_equal(s1, rng.choice([-1.0, 1.0], 128))
    assert np.array_equal(s2, rng.choice([-1.0, 1.0], 128))


def test_llamacpp_dequant_is_centroid_times_norm_in_rotated_domain():
    x = keys_like(shape=(1, 4, 256))
    codec = tq(bits=4, variant="llamacpp")
    enc = codec.encode(x, "k")
    idx = turboquant.unpack_codes(np, {"lo": enc.arrays["codes_lo"]}, 4, 256).reshape(8, 128)
    c = turboquant.codebook("production", 4, 128)
    m = turboquant.wht_rotation(128, 42)
    y = c[idx] * enc.arrays["norms"].astype(np.float64).reshape(8, 1)
    np.testing.assert_allclose(codec.decode(enc).reshape(8, 128), y @ m.T, atol=1e-5)
    # corrected norm: ||x_group|| / ||c[idx]||
    g = x.reshape(8, 128)
    corr = np.linalg.norm(g, axis=1) / np.linalg.norm(c[idx], axis=1)
    np.testing.assert_allclose(enc.arrays["norms"].reshape(8), corr, rtol=1e-3)


def test_nearest_equals_searchsorted_including_ties():
    c = turboquant.codebook("prototype", 3, 64).astype(np.float32)
    mids = (c[1:] + c[:-1]) / 2
    v = np.random.default_rng(5).standard_normal(1000).astype(np.float32) / 8
    v = np.concatenate([v, mids])
    for ties_up, side in ((False, "left"), (True, "right")):
        got = turboquant.nearest(np, v, mids.astype(np.float64), ties_up=ties_up)
        assert np.array_equal(got, np.searchsorted(mids, v, side=side))
    assert np.array_equal(turboquant.nearest(np, v, mids), wht.quantize_nearest(np, v, c))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_row_chunks_match_one_pass_and_are_deterministic(monkeypatch, bits):
    """Threaded 5-row chunks (ragged last one) give the one-chunk result, rerun bit for bit.

    BLAS may pick another kernel for 5 rows than for 74, so floats agree to rounding and codes
    to the rare midpoint flip; rows landing in the wrong place would break every row.
    """
    x = keys_like(shape=(2, 37, 64))
    x[0, 5] = 0.0
    codec = tq(bits=bits)
    monkeypatch.setattr(turboquant, "CHUNK_ELEMS", 1 << 40)
    whole = {s: codec.encode(x, s) for s in ("k", "v")}
    whole_dec = {s: codec.decode(e) for s, e in whole.items()}
    monkeypatch.setattr(turboquant, "CHUNK_ELEMS", 5 * 64)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    for s, ref in whole.items():
        enc, again = codec.encode(x, s), codec.encode(x, s)
        assert enc.arrays.keys() == ref.arrays.keys()
        for key, a in ref.arrays.items():
            assert np.array_equal(enc.arrays[key], again.arrays[key]), (s, key)
            if a.dtype == np.uint8:
                assert (enc.arrays[key] == a).mean() > 0.99, (s, key)
            else:
                np.testing.assert_allclose(enc.arrays[key], a, rtol=1e-5, err_msg=f"{s} {key}")
        dec = codec.decode(enc)
        assert np.array_equal(dec, codec.decode(again))
        np.testing.assert_allclose(dec, whole_dec[s], rtol=0, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("width", [1, 2, 4])
def test_packing_is_the_shared_lsb_first_layout(width):
    codes = np.random.default_rng(width).integers(0, 2**width, (7, 37)).astype(np.uint8)
    packed = turboquant._pack(np, codes, width)
    assert np.array_equal(packed, wht.pack_bits(np, codes, width))
    assert np.array_equal(turboquant._unpack(np, packed, width, 37), codes)


def test_three_bit_codes_use_the_fork_2_plus_1_layout():
    idx = np.random.default_rng(0).integers(0, 8, (3, 64)).astype(np.uint8)
    p = turboquant.pack_codes(np, idx, 3)
    qs, signs = p["lo"], p["hi"]
    j = np.arange(64)
    lo = (qs[:, j // 4] >> (2 * (j % 4))) & 3
    hi = (signs[:, j // 8] >> (j % 8)) & 1
    assert np.array_equal(lo | (hi << 2), idx)
    assert np.array_equal(turboquant.unpack_codes(np, p, 3, 64), idx)
    vals = np.linspace(-1, 1, 8).astype(np.float32)
    lut = turboquant.decode_lut(vals, 3)
    assert np.array_equal(turboquant.lut_decode(np, p, 3, lut, 64), vals[idx])


def test_bad_params_and_streams():
    for params, key in [
        ({"bits": 5}, "bits"),
        ({"bits": 1}, "bits"),
        ({"bits": True}, "bits"),
        ({"variant": "cuda"}, "variant"),
        ({"codebook": "beta"}, "codebook"),
        ({"norm_dtype": "float64"}, "norm_dtype"),
        ({"variant": "llamacpp", "qjl": "orthogonal"}, "qjl"),
        ({"variant": "llamacpp", "group": 96}, "group"),
        ({"group": 64}, "group"),
        ({"seed": -1}, "seed"),
        ({"qjl_shrinkage": 0}, "qjl_shrinkage"),
    ]:
        with pytest.raises(KvbenchError, match=key):
            tq(**params)
    with pytest.raises(KvbenchError, match="unknown parameter"):
        tq(bitz=3)
    with pytest.raises(KvbenchError, match="stream"):
        tq().encode(np.zeros((1, 2, 64), np.float32), "q")


# ----------------------------------------------------------------------------- GPU parity


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["prototype", "llamacpp"])
@pytest.mark.parametrize("hd", [64, 96, 256])
def test_cupy_matches_numpy(cp, variant, hd):
    """Same code on CuPy: identical bytes, >99.9% identical indices (float32 midpoint flips)."""
    x = keys_like(shape=(2, 2000, hd))
    for b in (2, 3, 4):
        spec = {"family": "turboquant", "bits": b, "variant": variant}
        c_np, c_cp = build_from_spec("c", spec), build_from_spec("c", spec, cp)
        for s in ("k", "v"):
            e_np, e_cp = c_np.encode(x, s), c_cp.encode(cp.asarray(x), s)
            assert c_np.nbytes(e_np) == c_cp.nbytes(e_cp)
            assert c_np.legacy_nbytes(e_np) == c_cp.legacy_nbytes(e_cp)
            for key, a in e_np.arrays.items():
                g = cp.asnumpy(e_cp.arrays[key])
                assert g.shape == a.shape and g.dtype == a.dtype, key
                if key.startswith("codes") or key == "signs":
                    bits = np.unpackbits(a ^ g).sum() if a.size else 0
                    assert bits <= 1e-3 * a.size * 8, (key, bits)
                else:
                    np.testing.assert_allclose(
                        g.astype(np.float32), a.astype(np.float32), rtol=2e-3
                    )  # noqa: E501
            d_np, d_cp = c_np.decode(e_np), cp.asnumpy(c_cp.decode(e_cp))
            rel = np.linalg.norm(d_np - d_cp) / np.linalg.norm(x)
            assert rel < 2e-2, (b, s, rel)
            # decoding the numpy stream on the GPU gives the numpy result
            moved = type(e_np)(
                e_np.shape, {k: cp.asarray(v) for k, v in e_np.arrays.items()}, dict(e_np.meta)
            )  # noqa: E501
            np.testing.assert_allclose(
                cp.asnumpy(c_cp.decode(moved)), d_np, atol=1e-4 * float(np.abs(x).max())
            )  # noqa: E501
