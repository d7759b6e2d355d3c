"""The shared test catalogue of the kernels: the dtypes a model may hold and the odd shapes."""

import math

import numpy as np
import torch

# Every real dtype a model's weights, gradients or activations may have.
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]
# torch's wider unsigned integers, rarer but accepted.
UNSIGNED_WIDE = [torch.uint16, torch.uint32, torch.uint64]

# STYLE.md's catalogue: scalar, one element, powers of two, powers of two + 17, odd/prime sizes,
# zero-size (non-contiguous and transposed views are built from these in the tests).
SHAPES = [(), (1,), (2,), (16,), (1024,), (4096,), (18,), (33,), (1041,), (4113,)]
SHAPES += [(311, 384), (5, 9999)]
SHAPES += [(0,), (3, 0, 4)]


def stats_reference(x: torch.Tensor) -> np.ndarray:
    """The STAT_NAMES row of a CPU tensor, in float64 numpy: the oracle of every stats test."""
    xd = x.double().numpy().reshape(-1)
    fin = xd[np.isfinite(xd)]
    return np.array(
        [
            fin.size,
            fin.sum(),
            (fin * fin).sum(),
            fin.min() if fin.size else math.inf,
            fin.max() if fin.size else -math.inf,
            np.abs(fin).max() if fin.size else 0.0,
            np.isnan(xd).sum(),
            (xd == math.inf).sum(),
            (xd == -math.inf).sum(),
            (xd == 0).sum(),
        ]
    )
