"""Codec families; importing this package registers each of them with the registry."""

from kvbench.codecs import (
    ggml,  # noqa: F401
    identity,  # noqa: F401
    kakeya,  # noqa: F401
    kakeyaturbo,  # noqa: F401
    split,  # noqa: F401
    turboquant,  # noqa: F401
)
from kvbench.codecs.base import BYTE_FIELDS, Codec, Encoded, build_codec, resolve_spec

__all__ = ["BYTE_FIELDS", "Codec", "Encoded", "build_codec", "resolve_spec"]
