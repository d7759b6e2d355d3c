"""``benchmarks/cpu_alloc.py``: after settling, blocks of activation size come from the heap
(glibc), whose pages are reused, not from a fresh ``mmap`` that page-faults on every use.

Checked in fresh interpreters, as the benchmarks settle it first thing (in the test process
the allocator's state depends on every test before), by glibc's own count of the bytes it
holds in mmapped blocks (``mallinfo2().hblkhd``): a 16 MiB block adds 16 MiB there unless the
mmap threshold was raised above it."""

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_alloc.py"
CHILD_TIMEOUT = 120  # seconds

_CHILD = """
import ctypes, sys
import torch
sys.path.insert(0, sys.argv[1])
from cpu_alloc import settle_cpu_allocator

class Info(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[2] == "1":
    settle_cpu_allocator()
before = libc.mallinfo2().hblkhd
block = torch.empty(4 << 20)  # 16 MiB of float32
block.fill_(1.0)
print(libc.mallinfo2().hblkhd - before)
"""


def _mmapped_bytes(settle: bool) -> int:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(SCRIPT.parent), "1" if settle else "0"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    return int(child.stdout.split()[-1])


def _has_mallinfo2() -> bool:
    return platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc's mmap threshold (mallinfo2: 2.33+)")
def test_settled_allocator_serves_activation_sized_blocks_from_the_heap():
    assert _mmapped_bytes(settle=False) >= 16 << 20  # unsettled: a fresh mapping
    assert _mmapped_bytes(settle=True) == 0  # settled: from the heap
