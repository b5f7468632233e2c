"""bf16 passthrough: the control codec (ratio 1.0, zero error on bf16-captured input)."""

from __future__ import annotations

from kvbench.codecs.base import Codec, Encoded, bf16_round, register


@register
class Identity(Codec):
    family = "identity"

    def encode(self, x, stream: str = "k", layer: int = 0) -> Encoded:
        return Encoded(shape=tuple(x.shape), arrays={"x": bf16_round(self.xp, x)})

    def decode(self, enc: Encoded):
        return enc.arrays["x"]

    def nbytes(self, enc: Encoded) -> dict[str, int]:
        n_kv, t, d = enc.shape
        return {"codes": 2 * n_kv * t * d}
