"""A settled CPU allocator for the CPU benchmarks: one large block freed before any timing.

glibc's malloc serves a block above its mmap threshold (128 KiB at start) with a fresh
``mmap`` and unmaps it at free, so every activation of that size page-faults again on its
next use. Freeing an mmapped block raises the threshold to its size (up to 32 MiB) and the
heap's trim threshold to twice that; from then on such blocks are reused from the heap. When
that happens depends on the process's history, so a benchmark that switches between
configurations timed some windows before it and some after: on the 2-core dev VM the bench
CNN's plain step took 23-27 ms with 2.7-4.5k page faults a step, and 19-24 ms with none once a
30 MiB block had been freed. Settling it first times every configuration in the same regime,
the one a long training run reaches with its first large free.
"""

from __future__ import annotations

import torch

SETTLE_BYTES = 30 << 20  # below glibc's 32 MiB cap on the dynamic mmap threshold


def settle_cpu_allocator() -> None:
    """Allocate, touch and free one ``SETTLE_BYTES`` block (a no-op for other allocators)."""
    block = torch.empty(SETTLE_BYTES // 4, dtype=torch.float32)
    block.fill_(0.0)  # touch every page: the block is really mapped
    del block
