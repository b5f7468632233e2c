"""Checksummed, memory-mappable npy shards of bf16 tensors, and the capture manifest.

A shard stores the raw bf16 bit pattern as ``uint16`` (numpy has no bf16 dtype), so the round trip
is lossless; the manifest says so under ``storage``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kvbench.errors import KvbenchError

MANIFEST_FORMAT = "kvbench-capture/1"
BF16_STORAGE = "uint16-bf16-bits"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: str | Path, write) -> str:
    """Write through ``write(file)`` to a temp file beside ``path``, fsync, chmod, rename.

    Readers never see half a file, an interrupted run leaves no output behind, and the file gets
    the usual umask permissions (mkstemp alone would make it 0600). Returns the sha256.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit pattern (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bf16 bit pattern (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def write_shard(path: str | Path, bits: np.ndarray) -> str:
    """Atomically write a uint16 bf16-bit array as .npy; return its sha256."""
    if bits.dtype != np.uint16:
        raise KvbenchError(f"shard {path}: expected uint16 bf16 bits, got {bits.dtype}")
    return _atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(bits), allow_pickle=False))


def load_manifest(capture_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json`` of a capture directory."""
    path = Path(capture_dir) / "manifest.json"
    if not path.is_file():
        raise KvbenchError(f"{path}: no capture manifest (run the capture_kv rule first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KvbenchError(f"{path}: manifest is not valid JSON ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise KvbenchError(
            f"{path}: unknown manifest format {manifest.get('format')!r}, want {MANIFEST_FORMAT}"
        )
    if manifest.get("storage") != BF16_STORAGE:
        raise KvbenchError(f"{path}: unsupported shard storage {manifest.get('storage')!r}")
    return manifest


def n_cached_layers(manifest: dict[str, Any]) -> int:
    """Cache layers of a capture (negative ``skip_layers`` count back from this)."""
    return max(int(e["index"]) for e in manifest["layers"]) + 1


def read_shard(capture_dir: str | Path, entry: dict[str, Any], verify: bool = True) -> np.ndarray:
    """Load one shard described by a manifest entry ``{file, shape, sha256}`` as float32.

    Verifies the sha256 and shape; a corrupt or truncated file raises an error naming it.
    """
    path = Path(capture_dir) / entry["file"]
    if not path.is_file():
        raise KvbenchError(f"{path}: shard listed in the manifest is missing")
    if verify:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise KvbenchError(
                f"{path}: sha256 mismatch (manifest {entry['sha256'][:12]}…, "
                f"file {digest[:12]}…); the shard is corrupt or truncated: delete the capture "
                "directory and rerun capture_kv"
            )
    try:
        bits = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise KvbenchError(f"{path}: not a readable .npy shard ({e})") from e
    if list(bits.shape) != list(entry["shape"]) or bits.dtype != np.uint16:
        raise KvbenchError(
            f"{path}: shape/dtype {list(bits.shape)}/{bits.dtype} differs from the manifest's "
            f"{entry['shape']}/uint16"
        )
    return bf16_bits_to_float(bits)
