"""Reproducible randomness for DARE-style methods, independent of execution order, threads and device.

Every element of every tensor gets its uniform draw from a stream addressed by
(seed, output tensor name, model position in the config, block of BLOCK elements). Chunk boundaries are
multiples of BLOCK, so any chunking regenerates the same numbers. The generator is numpy's PCG64 seeded
through SeedSequence (fast, and specified bit for bit across platforms); draws are made on the CPU and
moved to the compute device.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

BLOCK = 1 << 20


class TensorNoise:
    """Uniform [0, 1) float32 draws for elements [start, start+count) of one tensor, per model."""

    def __init__(self, seed: int, tensor: str, positions: list[int], start: int, count: int, shape: torch.Size):
        assert start % BLOCK == 0, "chunks must start on a block boundary"
        self.seed = seed
        self.tensor_key = zlib.crc32(tensor.encode())
        self.positions = positions  # call index -> model position in the config
        self.start = start
        self.count = count
        self.shape = shape
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            self._cache[index] = self._draw(self.positions[index]).reshape(self.shape)
        return self._cache[index]

    def _draw(self, position: int) -> torch.Tensor:
        out = np.empty(self.count, dtype=np.float32)
        first = self.start // BLOCK
        done = 0
        block = first
        while done < self.count:
            n = min(BLOCK, self.count - done)
            ss = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.seed >> 32, self.tensor_key, position, block])
            np.random.Generator(np.random.PCG64(ss)).random(n, dtype=np.float32, out=out[done:done + n])
            done += n
            block += 1
        return torch.from_numpy(out)
