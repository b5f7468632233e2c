"""Exact port of rand 0.8.6 ``SmallRng::seed_from_u64`` (Xoshiro256++, PCG32-seeded) on x86_64.

kakeyaturbo draws its WHT sign pattern and its first K-means centre from this generator, so a
bit-exact port is what makes those tables match the Rust crate (spec kakeya.md 2.3).

Host-side pure Python (64-bit wrap-around by masking); it only produces small seed-derived tables.

- seeding: rand_core 0.6.4's default ``seed_from_u64`` (SmallRng does not override it): 8 PCG32
  steps ``state = state*6364136223846793005 + 11634580027462260723``, output
  ``rotr32(((state >> 18) ^ state) >> 27, state >> 59)``, bytes little-endian -> 4 LE u64 words.
- ``next_u64``: Xoshiro256++; ``next_u32`` = high half of ``next_u64``.
- ``gen_bool()`` = rand's ``Standard`` bool: ``(next_u32 as i32) < 0``, i.e. bit 63.
- ``gen_range(n)`` = ``gen_range(0..n)`` for usize/u64: Lemire widening multiply with
  ``zone = (n << lzcnt(n)) - 1``; accept ``hi`` when ``lo <= zone``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
_PCG_MUL = 6364136223846793005
_PCG_INC = 11634580027462260723


def _rotl64(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & M64


def _rotr32(x: int, r: int) -> int:
    r &= 31
    return ((x >> r) | (x << (32 - r))) & M32


class SmallRng:
    """rand 0.8.6 ``SmallRng`` on 64-bit targets (Xoshiro256++)."""

    __slots__ = ("s",)

    def __init__(self, state: tuple[int, int, int, int]):
        if not any(state):
            # Xoshiro256PlusPlus::from_seed maps the all-zero seed to seed_from_u64(0)
            state = SmallRng.seed_from_u64(0).s
        self.s = [int(v) & M64 for v in state]

    @classmethod
    def seed_from_u64(cls, seed: int) -> SmallRng:
        state = int(seed) & M64
        words = []
        for _ in range(8):
            state = (state * _PCG_MUL + _PCG_INC) & M64
            xorshifted = (((state >> 18) ^ state) >> 27) & M32
            words.append(_rotr32(xorshifted, state >> 59))
        s = tuple(words[2 * i] | (words[2 * i + 1] << 32) for i in range(4))
        return cls(s)

    def next_u64(self) -> int:
        s0, s1, s2, s3 = self.s
        res = (_rotl64((s0 + s3) & M64, 23) + s0) & M64
        t = (s1 << 17) & M64
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = _rotl64(s3, 45)
        self.s = [s0, s1, s2, s3]
        return res

    def next_u32(self) -> int:
        return self.next_u64() >> 32

    def gen_bool(self) -> bool:
        """``rng.gen::<bool>()``: the sign bit of ``next_u32``."""
        return (self.next_u32() >> 31) == 1

    def gen_range(self, n: int) -> int:
        """``rng.gen_range(0..n)`` for usize on a 64-bit target (n >= 1)."""
        n = int(n)
        if not 1 <= n <= M64:
            raise ValueError(f"gen_range(0..{n}): empty or too large range")
        zone = ((n << (64 - n.bit_length())) & M64) - 1
        while True:
            prod = self.next_u64() * n
            hi, lo = prod >> 64, prod & M64
            if lo <= zone:
                return hi


@lru_cache(maxsize=256)
def _sign_pattern_cached(seed: int, n: int) -> np.ndarray:
    rng = SmallRng.seed_from_u64(seed)
    out = np.fromiter((1 if rng.gen_bool() else -1 for _ in range(n)), dtype=np.int8, count=n)
    out.setflags(write=False)
    return out


def sign_pattern(seed: int, n: int) -> np.ndarray:
    """kakeyaturbo ``sign_pattern(seed, n)``: n successive bools, +1 if true else -1 (int8).

    Prefix-consistent: ``sign_pattern(s, m) == sign_pattern(s, n)[:m]`` for m <= n.
    """
    return _sign_pattern_cached(int(seed) & M64, int(n))


def first_gen_range(seed: int, n: int) -> int:
    """``SmallRng::seed_from_u64(seed).gen_range(0..n)``: kakeyaturbo's first K-means centre."""
    return SmallRng.seed_from_u64(seed).gen_range(n)
