"""Asymmetric K/V: one codec for K and another for V (e.g. ``q8_0`` K + ``turbo3`` V).

Configured by name (``{family: split, k: q8_0, v: turbo3}``); ``base.resolve_spec`` replaces each
name with that codec's resolved spec ``{name, family, ...}`` before the codec is built, so editing a
part reruns every split that uses it. Every call is delegated to the part of the stream; the
``Encoded`` remembers its stream (``meta["split_stream"]``) so ``decode``/``nbytes`` route it back.
``part(stream)`` is the sub-codec; the runner records its name as the row's ``stream_codec``.
"""

from __future__ import annotations

from kvbench.codecs.base import STREAMS, Codec, Encoded, build_from_spec, register
from kvbench.errors import KvbenchError

_STREAM_KEY = "split_stream"


@register
class Split(Codec):
    family = "split"
    DEFAULTS = {"k": None, "v": None}

    def check_params(self) -> None:
        self._parts: dict[str, Codec] = {}
        for stream in STREAMS:
            spec = self.params[stream]
            if spec is None:
                raise self._param_error(
                    stream, "is required: the name of the codec for this stream"
                )
            if isinstance(spec, str):
                raise self._param_error(
                    stream,
                    f"must be a resolved codec spec, got the bare name {spec!r}; build split "
                    "codecs with build_codec(name, codecs_cfg) so resolve_spec expands the parts",
                )
            if not isinstance(spec, dict) or "family" not in spec:
                raise self._param_error(
                    stream, f"must be a codec spec with a 'family', got {spec!r}"
                )
            if spec["family"] == "split":
                raise self._param_error(stream, "must not itself be a split codec")
            spec = dict(spec)
            part_name = spec.pop("name", f"{self.name}.{stream}")
            self._parts[stream] = build_from_spec(part_name, spec, self.xp)

    def part(self, stream: str) -> Codec:
        """The codec that handles ``stream`` ('k' or 'v')."""
        if stream not in STREAMS:
            raise KvbenchError(
                f"codec {self.name!r}: stream must be one of {STREAMS}, got {stream!r}"
            )
        return self._parts[stream]

    def compresses_sliding(self, stream: str) -> bool:
        return self.part(stream).compresses_sliding(stream)

    def _part_of(self, enc: Encoded) -> Codec:
        stream = enc.meta.get(_STREAM_KEY)
        if stream is None:
            raise KvbenchError(
                f"codec {self.name!r}: this Encoded was not produced by a split codec"
            )
        return self.part(stream)

    def encode(self, x, stream: str = "k", layer: int = 0) -> Encoded:
        enc = self.part(stream).encode(x, stream=stream, layer=layer)
        enc.meta[_STREAM_KEY] = stream
        return enc

    def decode(self, enc: Encoded):
        return self._part_of(enc).decode(enc)

    def nbytes(self, enc: Encoded) -> dict[str, int]:
        return self._part_of(enc).nbytes(enc)

    def legacy_nbytes(self, enc: Encoded) -> dict[str, int]:
        return self._part_of(enc).legacy_nbytes(enc)
