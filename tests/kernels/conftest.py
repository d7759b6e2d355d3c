"""Kernel tests run the Triton kernels on CPU tensors under the interpreter where there is no
GPU; TRITON_INTERPRET must be set before any @triton.jit module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
