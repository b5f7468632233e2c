"""Split K/V codecs: each stream goes to its part; bytes are the parts' bytes."""

import numpy as np
import pytest

from kvbench.codecs.base import build_codec, build_from_spec, resolve_spec
from kvbench.errors import KvbenchError

CODECS = {
    "identity": {"family": "identity"},
    "turbo3": {"family": "turboquant", "variant": "prototype", "bits": 3},
    "turbo4": {"family": "turboquant", "variant": "prototype", "bits": 4},
    "q8_0": {"family": "ggml", "type": "q8_0"},
    "q8_0K_turbo3V": {"family": "split", "k": "q8_0", "v": "turbo3"},
    "idK_turbo4V": {"family": "split", "k": "identity", "v": "turbo4"},
}


def x_of(seed, shape=(2, 24, 64)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_streams_go_to_their_parts_and_bytes_are_the_parts_bytes():
    split = build_codec("q8_0K_turbo3V", CODECS)
    q8 = build_codec("q8_0", CODECS)
    t3 = build_codec("turbo3", CODECS)
    assert split.part("k").name == "q8_0" and split.part("v").name == "turbo3"
    xk, xv = x_of(1), x_of(2)
    ek, ev = split.encode(xk, "k"), split.encode(xv, "v")
    np.testing.assert_array_equal(split.decode(ek), q8.decode(q8.encode(xk, "k")))
    np.testing.assert_array_equal(split.decode(ev), t3.decode(t3.encode(xv, "v")))
    assert split.nbytes(ek) == q8.nbytes(q8.encode(xk, "k"))
    assert split.nbytes(ev) == t3.nbytes(t3.encode(xv, "v"))
    n = 2 * 24
    total = sum(split.nbytes(ek).values()) + sum(split.nbytes(ev).values())
    assert total == n * 64 // 32 * 34 + n * (3 * 64 // 8 + 4)
    assert split.legacy_nbytes(ek) == {}  # ggml has no legacy column
    assert split.legacy_nbytes(ev) == {"legacy_norm_free": n * 64 * 3 // 8}


def test_compresses_sliding_delegates():
    class Passer:  # a stand-in part that leaves sliding layers alone, like Kakeya
        name = "passer"

        def compresses_sliding(self, stream):
            return False

    split = build_codec("idK_turbo4V", CODECS)
    assert split.compresses_sliding("k") and split.compresses_sliding("v")
    split._parts["k"] = Passer()
    assert not split.compresses_sliding("k") and split.compresses_sliding("v")


def test_resolved_spec_carries_the_parts():
    spec = resolve_spec("q8_0K_turbo3V", CODECS)
    assert spec["k"] == {"name": "q8_0", "family": "ggml", "type": "q8_0"}
    assert spec["v"]["bits"] == 3
    split = build_from_spec("q8_0K_turbo3V", spec)
    assert split.part("v").params["bits"] == 3


def test_validation():
    with pytest.raises(KvbenchError, match="'v' is required"):
        build_from_spec("s", {"family": "split", "k": {"family": "identity"}})
    with pytest.raises(KvbenchError, match="bare name"):
        build_from_spec("s", {"family": "split", "k": "q8_0", "v": "turbo3"})
    with pytest.raises(KvbenchError, match="must not itself be a split"):
        build_from_spec(
            "s", {"family": "split", "k": {"family": "split"}, "v": {"family": "identity"}}
        )
    with pytest.raises(KvbenchError, match="bits"):  # a bad part parameter names the part
        build_from_spec(
            "s",
            {
                "family": "split",
                "k": {"family": "identity"},
                "v": {"family": "turboquant", "bits": 9},
            },  # noqa: E501
        )
    split = build_codec("q8_0K_turbo3V", CODECS)
    with pytest.raises(KvbenchError, match="stream"):
        split.part("q")
    enc = build_codec("q8_0", CODECS).encode(x_of(0), "k")
    with pytest.raises(KvbenchError, match="not produced by a split"):
        split.decode(enc)


def test_runner_records_parts_bytes_and_legacy(tmp_path):
    from synthetic import make_capture

    from kvbench.compress import compress_capture

    cap = make_capture(tmp_path / "cap", [("full", 2, 40, 64), ("sliding", 2, 16, 64)])
    table, _ = compress_capture(cap, "q8_0K_turbo3V", CODECS)
    assert list(table.stream_codec) == ["q8_0", "turbo3"] * 2  # sliding layers compressed too
    k, v = table[table.stream == "k"], table[table.stream == "v"]
    assert (k.bytes_total == k.n_kv * k.tokens * 64 // 32 * 34).all()
    assert (v.bytes_total == v.n_kv * v.tokens * (3 * 64 // 8 + 4)).all()
    assert k.legacy_norm_free.isna().all()
    assert (v.legacy_norm_free == v.n_kv * v.tokens * 64 * 3 / 8).all()
    assert (table.mse > 0).all() and (table.cos_sim > 0.9).all()
