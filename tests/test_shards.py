"""Shards: lossless bf16 round trip, checksum/shape verification naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvbench.capture import _bits
from kvbench.errors import KvbenchError
from kvbench.shards import (
    BF16_STORAGE,
    MANIFEST_FORMAT,
    bf16_bits_to_float,
    float_to_bf16_bits,
    load_manifest,
    read_shard,
    write_shard,
)


def _special_bf16() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 257, 16, generator=g) * 10
    x.view(-1)[:8] = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 3.0e38, -3.0e38]
    )
    return x.to(torch.bfloat16)


def test_bf16_round_trip_is_bit_exact(tmp_path):
    t = _special_bf16()
    t.view(-1)[8] = float("nan")
    bits = _bits(t)
    assert bits.dtype == np.uint16 and bits.shape == (3, 257, 16)
    digest = write_shard(tmp_path / "x.npy", bits)
    back = read_shard(tmp_path, {"file": "x.npy", "shape": [3, 257, 16], "sha256": digest})
    assert back.dtype == np.float32
    # The file holds the exact bit patterns (NaN payload included) ...
    assert np.array_equal(np.load(tmp_path / "x.npy"), t.view(torch.int16).numpy().view(np.uint16))
    # ... and the float32 view is exact: converting back to bf16 gives the same bits (NaN aside,
    # whose payload torch canonicalises).
    ok = ~np.isnan(back)
    again = torch.from_numpy(np.ascontiguousarray(back)).to(torch.bfloat16)
    assert np.array_equal(again.view(torch.int16).numpy().view(np.uint16)[ok], bits[ok])
    assert np.array_equal(float_to_bf16_bits(back)[ok], bits[ok])
    assert np.isnan(back.reshape(-1)[8])


def test_float_to_bf16_bits_matches_torch_rounding():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 3
    ours = float_to_bf16_bits(x.numpy())
    theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(bf16_bits_to_float(ours), x.to(torch.bfloat16).float().numpy())


def test_bits_rejects_non_bf16():
    with pytest.raises(KvbenchError, match="bf16"):
        _bits(torch.zeros(2, dtype=torch.float32))


def _one_shard(tmp_path):
    bits = _bits(_special_bf16())
    digest = write_shard(tmp_path / "L00.k.npy", bits)
    return {"file": "L00.k.npy", "shape": list(bits.shape), "sha256": digest}


def test_flipped_byte_is_detected_and_named(tmp_path):
    entry = _one_shard(tmp_path)
    p = tmp_path / "L00.k.npy"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(KvbenchError, match=r"L00\.k\.npy: sha256 mismatch"):
        read_shard(tmp_path, entry)


def test_truncated_file_is_detected_and_named(tmp_path):
    entry = _one_shard(tmp_path)
    p = tmp_path / "L00.k.npy"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(KvbenchError, match=r"L00\.k\.npy"):
        read_shard(tmp_path, entry)
    # Even without checksum verification a truncated npy is an error naming the file.
    with pytest.raises(KvbenchError, match=r"L00\.k\.npy"):
        read_shard(tmp_path, entry, verify=False)


def test_missing_shard_and_shape_mismatch(tmp_path):
    entry = _one_shard(tmp_path)
    with pytest.raises(KvbenchError, match="shape"):
        read_shard(tmp_path, {**entry, "shape": [1, 2, 3]})
    (tmp_path / "L00.k.npy").unlink()
    with pytest.raises(KvbenchError, match=r"L00\.k\.npy: shard listed in the manifest is missing"):
        read_shard(tmp_path, entry)


def test_load_manifest_checks_format(tmp_path):
    with pytest.raises(KvbenchError, match="no capture manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(KvbenchError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": "other", "storage": BF16_STORAGE})
    )
    with pytest.raises(KvbenchError, match="unknown manifest format"):
        load_manifest(tmp_path)
    good = {"format": MANIFEST_FORMAT, "storage": BF16_STORAGE, "layers": []}
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    assert load_manifest(tmp_path)["format"] == MANIFEST_FORMAT
