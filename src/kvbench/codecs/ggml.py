"""llama.cpp's ggml KV-cache baselines ``q8_0`` and ``q4_0`` (spec turboquant.md 3.4).

Blocks of 32 consecutive values along the head dimension, one fp16 scale ``d`` per block:

``q8_0`` (34 B per 32 values, 8.5 bits/value), as ``quantize_row_q8_0_ref``:
    ``d = max|x| / 127``; ``q = roundf(x * (1/d))`` (half away from zero; 0 when d = 0) as int8;
    the scale is stored as ``fp16(d)`` and decode is ``q * fp16(d)``.
``q4_0`` (18 B per 32 values, 4.5 bits/value), as ``quantize_row_q4_0_ref``:
    ``m`` = the first element of largest magnitude, with its sign; ``d = m / -8``;
    ``q = min(15, trunc(x * (1/d) + 8.5))`` in 0..15; byte ``j`` (0..15) holds
    ``q[j] | q[j+16] << 4``; decode ``(q - 8) * fp16(d)``.

Quantisation uses the float32 ``d`` and dequantisation the stored fp16 one, exactly as ggml. Bytes:
``codes`` = the int8 / nibble payload, ``norms`` = the fp16 scales; nothing else is stored.
Sliding-window layers are compressed like any other (llama.cpp quantises the whole cache).
"""

from __future__ import annotations

from kvbench.codecs.base import Codec, Encoded, register
from kvbench.errors import KvbenchError

QK = 32
TYPES = ("q8_0", "q4_0")


def _roundf(xp, v):
    """C ``roundf`` (half away from zero), exact for every float32 (no ``x + 0.5`` rounding)."""
    a = xp.abs(v)
    r = xp.floor(a)
    a -= r  # exact fractional part
    r += a >= 0.5
    return xp.copysign(r, v)


@register
class Ggml(Codec):
    family = "ggml"
    DEFAULTS = {"type": "q8_0"}
    COMPRESSES_SLIDING = True

    def check_params(self) -> None:
        if self.params["type"] not in TYPES:
            raise self._param_error("type", f"must be one of {TYPES}, got {self.params['type']!r}")
        self.type = self.params["type"]

    def _blocks(self, x):
        xp = self.xp
        shape = tuple(int(s) for s in x.shape)
        if len(shape) != 3:
            raise KvbenchError(
                f"codec {self.name!r}: expected x of shape [n_kv, T, D], got {shape}"
            )
        if shape[2] % QK:
            raise KvbenchError(
                f"codec {self.name!r} ({self.type}): head_dim {shape[2]} is not a multiple of the "
                f"ggml block size {QK}"
            )
        n_blocks = shape[0] * shape[1] * shape[2] // QK
        return shape, xp.ascontiguousarray(x, dtype=xp.float32).reshape(n_blocks, QK)

    def encode(self, x, stream: str = "k", layer: int = 0) -> Encoded:
        xp = self.xp
        shape, xb = self._blocks(x)
        if self.type == "q8_0":
            amax = xp.abs(xb).max(axis=1)
            d = amax / xp.float32(127.0)
            inv = xp.where(d != 0, 1.0 / xp.where(d != 0, d, xp.float32(1.0)), 0.0)
            v = xb * inv.astype(xp.float32)[:, None]
            codes = _roundf(xp, v).astype(xp.int8)
        else:
            j = xp.argmax(xp.abs(xb), axis=1)  # first index of the largest |x|
            m = xp.take_along_axis(xb, j[:, None], axis=1)[:, 0]
            d = m / xp.float32(-8.0)
            inv = xp.where(d != 0, 1.0 / xp.where(d != 0, d, xp.float32(1.0)), 0.0)
            v = xb * inv.astype(xp.float32)[:, None] + xp.float32(8.5)
            q = xp.minimum(xp.trunc(v), 15).astype(xp.uint8)  # (int8_t) cast truncates
            codes = q[:, : QK // 2] | (q[:, QK // 2 :] << xp.uint8(4))
        return Encoded(
            shape=shape,
            arrays={"codes": codes, "scales": d.astype(xp.float16)},
            meta={"type": self.type},
        )

    def decode(self, enc: Encoded):
        xp = self.xp
        d = enc.arrays["scales"].astype(xp.float32)[:, None]
        c = enc.arrays["codes"]
        if enc.meta["type"] == "q8_0":
            out = c.astype(xp.float32) * d
        else:
            lo = (c & xp.uint8(15)).astype(xp.float32)
            hi = (c >> xp.uint8(4)).astype(xp.float32)
            out = (xp.concatenate([lo, hi], axis=1) - xp.float32(8.0)) * d
        return out.reshape(enc.shape)

    def nbytes(self, enc: Encoded) -> dict[str, int]:
        n_kv, t, dim = enc.shape
        n_blocks = n_kv * t * dim // QK
        per_block = QK if enc.meta["type"] == "q8_0" else QK // 2
        return {"codes": n_blocks * per_block, "norms": n_blocks * 2}
