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
    torch.empty(block // 4).fill_(1.0)  # the first one may still grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(block // 4).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2048, faults  # unsettled: ~20k (every page of every block)
