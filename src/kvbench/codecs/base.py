"""The one codec interface, the byte vocabulary, and the registry that builds codecs from config.

Every family is written once against an array module ``xp`` (numpy or cupy) and works on a whole
layer-stream ``x: [n_kv, T, D]`` float32 at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from kvbench.errors import KvbenchError

#: Categories of stored bytes. ``nbytes`` returns exact integers for these keys (missing = 0):
#: skeleton    per-block/per-layer side data: bases, means, centres, codebooks, t_dir
#: codes       per-token payload: quantised values, cluster ids, residual values and indices
#: norms       per-vector or per-block norms and scales
#: tail        tokens kept exact in bf16 (e.g. Kakeya's recent tail)
#: passthrough a whole layer-stream stored as bf16 because the codec does not touch it
BYTE_FIELDS = ("skeleton", "codes", "norms", "tail", "passthrough")

STREAMS = ("k", "v")


@dataclass
class Encoded:
    """Everything a decoder needs for one layer-stream (arrays on the codec's ``xp``)."""

    shape: tuple[int, int, int]
    arrays: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Codec(ABC):
    """Base class: ``encode``/``decode``/``nbytes``; parameters validated at construction."""

    family: ClassVar[str]
    #: Parameter names and defaults; any other key in the config is an error.
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: Whether sliding-window layers are compressed (TurboQuant: yes; Kakeya: passed through).
    COMPRESSES_SLIDING: ClassVar[bool] = True

    def __init__(self, name: str, params: dict[str, Any] | None = None, xp: ModuleType = np):
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.DEFAULTS))
        if unknown:
            raise KvbenchError(
                f"codec {name!r} (family {self.family}): unknown parameter(s) {unknown}; "
                f"allowed: {sorted(self.DEFAULTS)}"
            )
        self.name = name
        self.xp = xp
        self.params = {**self.DEFAULTS, **params}
        self.check_params()

    def check_params(self) -> None:  # noqa: B027  (optional hook; most families override it)
        """Raise KvbenchError naming the parameter when a value is out of range."""

    def _param_error(self, key: str, msg: str) -> KvbenchError:
        return KvbenchError(f"codec {self.name!r}: parameter {key!r} {msg}")

    def compresses_sliding(self, stream: str) -> bool:
        return self.COMPRESSES_SLIDING

    @abstractmethod
    def encode(self, x, stream: str = "k", layer: int = 0) -> Encoded:
        """Compress ``x: [n_kv, T, D]`` float32 (``layer`` may seed per-layer randomness)."""

    @abstractmethod
    def decode(self, enc: Encoded):
        """Reconstruct ``[n_kv, T, D]`` float32 on ``xp``."""

    @abstractmethod
    def nbytes(self, enc: Encoded) -> dict[str, int]:
        """Exact stored bytes by category (keys from BYTE_FIELDS)."""

    def legacy_nbytes(self, enc: Encoded) -> dict[str, int]:
        """The original studies' byte conventions, as named extra columns (never summed)."""
        return {}


_FAMILIES: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make a family buildable by its ``family`` name."""
    _FAMILIES[cls.family] = cls
    return cls


def families() -> list[str]:
    return sorted(_FAMILIES)


def resolve_spec(name: str, codecs_cfg: dict[str, dict]) -> dict[str, Any]:
    """The full parameter dict of codec ``name``; split codecs embed their parts' specs.

    Snakemake uses this as a rule ``params`` so that editing one codec reruns only its jobs.
    """
    if name not in codecs_cfg:
        raise KvbenchError(f"unknown codec {name!r}; configured codecs: {sorted(codecs_cfg)}")
    spec = dict(codecs_cfg[name])
    if spec.get("family") == "split":
        for stream in STREAMS:
            part = spec.get(stream)
            if part == name or codecs_cfg.get(part, {}).get("family") == "split":
                raise KvbenchError(
                    f"codec {name!r}: split part {stream}={part!r} must not be split"
                )
            spec[stream] = {"name": part, **resolve_spec(part, codecs_cfg)}
    return spec


def codec_subconfig(name: str, codecs_cfg: dict[str, dict]) -> dict[str, dict]:
    """Only the config entries codec ``name`` depends on (itself and its split parts).

    Used as a Snakemake ``params`` value: editing one codec reruns only the jobs that use it.
    """
    spec = codecs_cfg.get(name)
    if spec is None:
        raise KvbenchError(f"unknown codec {name!r}; configured codecs: {sorted(codecs_cfg)}")
    parts = [spec[s] for s in STREAMS] if spec.get("family") == "split" else []
    return {n: codecs_cfg[n] for n in [name, *parts] if n in codecs_cfg}


def build_codec(name: str, codecs_cfg: dict[str, dict], xp: ModuleType = np) -> Codec:
    """Build codec ``name`` from the ``codecs:`` section of the config."""
    import kvbench.codecs  # noqa: F401  (registers every family)

    spec = resolve_spec(name, codecs_cfg)
    return build_from_spec(name, spec, xp)


def build_from_spec(name: str, spec: dict[str, Any], xp: ModuleType = np) -> Codec:
    """Build a codec from a resolved spec (``family`` + parameters)."""
    import kvbench.codecs  # noqa: F401

    params = dict(spec)
    family = params.pop("family", None)
    if family not in _FAMILIES:
        raise KvbenchError(
            f"codec {name!r}: unknown family {family!r}; known families: {families()}"
        )
    return _FAMILIES[family](name, params, xp)


_BF16_ROUND_KERNELS: dict = {}


def bf16_round(xp: ModuleType, x):
    """Round float32 to the nearest bf16 value (ties to even), returned as float32.

    On CuPy one fused elementwise kernel (the NumPy expression would launch five, each a full
    pass over the array with a temporary).
    """
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    if xp is np:
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32)
    if "k" not in _BF16_ROUND_KERNELS:
        _BF16_ROUND_KERNELS["k"] = xp.ElementwiseKernel(
            "uint32 b",
            "uint32 r",
            "r = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u",
            "kvbench_bf16_round",
        )
    return _BF16_ROUND_KERNELS["k"](bits).view(xp.float32)
