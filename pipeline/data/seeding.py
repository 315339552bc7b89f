"""Randomness as a pure function of names: what a sample looks like (augmentation), how it is
masked, and which source a batch comes from depend on (seed, …, sample key) only, never on which
process or worker handled it, nor on whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from typing import Any


def hash_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class SampleRandom(random.Random):
    """A ``random.Random`` whose stream is BLAKE2b in counter mode over the bytes it was made from.

    The loader makes one generator per sample, and seeding Mersenne Twister (624 words of state)
    cost more than all the draws an augmentation makes; this costs one hash per 8 draws. Every
    ``random.Random`` method works, as they all draw through ``random`` and ``getrandbits``."""

    def __init__(self, material: bytes = b""):
        self._material, self._block, self._words = material, 0, []
        self.gauss_next = None  # what random.Random.__init__ would set, for gauss()

    def seed(self, a: Any = None, version: int = 2) -> None:
        self.__init__(os.urandom(32) if a is None else repr(a).encode())

    def getstate(self) -> tuple:
        return self._material, self._block, tuple(self._words), self.gauss_next

    def setstate(self, state: tuple) -> None:
        self._material, self._block, words, self.gauss_next = state
        self._words = list(words)

    def _refill(self) -> None:
        block = hashlib.blake2b(self._material, digest_size=64, salt=self._block.to_bytes(16, "little"))
        self._block += 1
        self._words = list(struct.unpack("<8Q", block.digest()))

    def random(self) -> float:
        if not self._words:
            self._refill()
        return (self._words.pop() >> 11) * 2.0**-53

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        bits = value = 0
        while bits < k:
            if not self._words:
                self._refill()
            value |= self._words.pop() << bits
            bits += 64
        return value >> (bits - k)


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The augmentation generator of one sample: a function of (seed, epoch, key) only."""
    return SampleRandom(repr((seed, epoch, key)).encode())
