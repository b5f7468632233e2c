"""Codec families; importing this package registers each of them with the registry."""

from kvbench.codecs import identity  # noqa: F401
from kvbench.codecs.base import BYTE_FIELDS, Codec, Encoded, build_codec, resolve_spec

__all__ = ["BYTE_FIELDS", "Codec", "Encoded", "build_codec", "resolve_spec"]
