"""Suite-wide settings: hypothesis runs derandomised, so every run sees the same examples.

Without a GPU the Triton kernels run under the interpreter (CPU tensors), and
TRITON_INTERPRET must be set before any ``@triton.jit`` module is imported: here, so that any
subset of the suite, in any order, sees the kernels the same way (a test that imports
tbprobe first would otherwise fix them in compiled mode for the rest of the process)."""

import os

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("tbprobe", derandomize=True, database=None, deadline=None)
settings.load_profile("tbprobe")
