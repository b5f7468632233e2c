"""The compress runner: exact bytes, passthrough of untouched layers, errors, determinism."""

import numpy as np
import pytest
from synthetic import make_capture

from kvbench.compress import compress_capture
from kvbench.errors import KvbenchError
from kvbench.tables import read_parquet, write_parquet

CODECS = {"identity": {"family": "identity"}}


@pytest.fixture
def capture(tmp_path):
    return make_capture(tmp_path / "cap", [("full", 2, 64, 32), ("sliding", 2, 16, 32)])


def test_identity_is_lossless_and_ratio_one(capture):
    table, timing = compress_capture(capture, "identity", CODECS)
    assert len(table) == 4 and len(timing) == 4
    assert (table["bytes_total"] == table["baseline_bytes"]).all()
    assert (table["mse"] == 0).all() and (table["max_abs_err"] == 0).all()
    assert np.allclose(table["cos_sim"], 1.0)
    k = table[table.stream == "k"]
    assert (k["ip_rel_err"] == 0).all()
    assert table[table.stream == "v"]["ip_rel_err"].isna().all()


def test_table_is_bit_identical_across_runs(capture, tmp_path):
    a, _ = compress_capture(capture, "identity", CODECS)
    b, _ = compress_capture(capture, "identity", CODECS)
    write_parquet(a, tmp_path / "a.parquet")
    write_parquet(b, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert read_parquet(tmp_path / "a.parquet").equals(a)


def test_corrupt_shard_is_named(capture):
    shard = capture / "L01.v.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(KvbenchError, match="L01.v.npy"):
        compress_capture(capture, "identity", CODECS)


def test_unknown_codec(capture):
    with pytest.raises(KvbenchError, match="unknown codec 'nope'"):
        compress_capture(capture, "nope", CODECS)
