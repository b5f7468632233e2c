"""Boundary-layer skipping: any codec, with chosen layers left exact (bf16 passthrough).

The original studies found the first/last layers decisive (turboquant "boundary V", Kakeya's
per-layer PPL floor), so ``skip_layers: [0, 1, -2, -1]`` is an option of every codec.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kvbench.codecs.base import STREAMS, Codec, Encoded, build_from_spec, resolve_spec
from kvbench.errors import KvbenchError


def resolve_layers(layers: Iterable[int], n_layers: int) -> frozenset[int]:
    """Cache-layer indices; negative ones count from the end (``-1`` = last cached layer)."""
    if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise KvbenchError(f"skip_layers must be a list of layer indices, got {layers!r}")
    out = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise KvbenchError(f"skip_layers: {i!r} is not an integer layer index")
        j = int(i) + n_layers if int(i) < 0 else int(i)
        if not 0 <= j < n_layers:
            raise KvbenchError(f"skip_layers: layer {i} out of range for {n_layers} cached layers")
        out.add(j)
    return frozenset(out)


class SkipLayers(Codec):
    """Any codec, with the layers in ``skip`` stored exact (bf16 passthrough) on both streams.

    The original studies found the first/last layers decisive (turboquant "boundary V", Kakeya's
    per-layer PPL floor), so ``skip_layers: [0, 1, -2, -1]`` is a codec option; see
    :func:`build_codec_for_capture`.
    """

    def __init__(self, inner: Codec, skip: Sequence[int], n_layers: int):  # noqa: D107
        self.inner = inner
        self.name = inner.name
        self.family = inner.family
        self.xp = inner.xp
        self.params = {**inner.params, "skip_layers": [int(i) for i in skip]}
        self.skip = resolve_layers(skip, n_layers)

    def compresses_layer(self, layer: int, layer_type: str, stream: str) -> bool:
        if int(layer) in self.skip:
            return False
        return layer_type != "sliding" or self.inner.compresses_sliding(stream)

    def compresses_sliding(self, stream: str) -> bool:
        return self.inner.compresses_sliding(stream)

    def encode(self, x, stream: str = "k", layer: int = 0) -> Encoded:
        return self.inner.encode(x, stream=stream, layer=layer)

    def decode(self, enc: Encoded):
        return self.inner.decode(enc)

    def nbytes(self, enc: Encoded) -> dict[str, int]:
        return self.inner.nbytes(enc)

    def legacy_nbytes(self, enc: Encoded) -> dict[str, int]:
        return self.inner.legacy_nbytes(enc)

    def __getattr__(self, name: str):  # e.g. ``part`` of split codecs
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def build_codec_for_capture(name: str, codecs_cfg: dict[str, dict], n_layers: int, xp=np) -> Codec:
    """``build_codec`` plus the generic ``skip_layers`` option (resolved against ``n_layers``)."""
    spec = resolve_spec(name, codecs_cfg)
    skip = spec.pop("skip_layers", None)
    for stream in STREAMS:
        part = spec.get(stream)
        if isinstance(part, dict) and "skip_layers" in part:
            raise KvbenchError(
                f"codec {name!r}: split part {part.get('name')!r} has skip_layers; "
                "set skip_layers on the split codec itself"
            )
    codec = build_from_spec(name, spec, xp)
    return SkipLayers(codec, skip, n_layers) if skip else codec


def layer_compressed(codec: Codec, entry: dict[str, Any], stream: str) -> bool:
    """Whether ``codec`` compresses ``stream`` of manifest layer ``entry`` (else passthrough)."""
    if hasattr(codec, "compresses_layer"):
        return codec.compresses_layer(int(entry["index"]), entry["type"], stream)
    return entry["type"] != "sliding" or codec.compresses_sliding(stream)
