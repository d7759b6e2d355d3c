"""``benchmarks/cpu_alloc.py``: after settling, blocks of activation size reuse heap pages
(glibc): allocating, touching and freeing them no longer page-faults every time."""

import importlib.util
import platform
import resource
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_alloc.py"


@pytest.fixture(scope="module")
def cpu_alloc():
    spec = importlib.util.spec_from_file_location("cpu_alloc_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


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
