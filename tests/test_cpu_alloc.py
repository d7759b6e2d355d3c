"""``benchmarks/cpu_alloc.py``: after settling, blocks of activation size reuse heap pages
(glibc): allocating, touching and freeing them no longer page-faults every time."""

import platform
import resource
from pathlib import Path

import pytest
import torch

from tests.scripts import loaded_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_alloc.py"


@pytest.fixture(scope="module")
def cpu_alloc():
    with loaded_script(SCRIPT, "cpu_alloc_under_test") as mod:
        yield mod


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold is glibc's")
def test_settled_blocks_of_activation_size_do_not_fault_again(cpu_alloc):
    cpu_alloc.settle_cpu_allocator()
    block = 8 << 20  # 2048 pages of 4 KiB: a fresh mapping faults on each
    # This thread's faults only (threads left by other tests fault too), all of them here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.empty(block // 4).fill_(1.0)  # the first one may still grow the heap
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(10):
            torch.empty(block // 4).fill_(1.0)
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    finally:
        torch.set_num_threads(threads)
    # settled: about one block's pages at most (measured 0-2048: the heap may grow once
    # more); unsettled: 16k-20k (every page of most blocks)
    assert faults < 3 * 2048, faults
