"""The public kernels API picks Triton or the torch/host path, and both agree."""

import numpy as np
import pytest
import torch

from tbprobe import kernels


def _x():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=g) * 3
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return x


@pytest.mark.interpreter
@pytest.mark.parametrize("bins", ["tensorflow", 17, [-1.0, 0.0, 0.5, 4.0]], ids=str)
def test_forced_triton_equals_host_path(monkeypatch, bins):
    """TBPROBE_KERNELS=triton on CPU tensors runs the kernels (interpreted) with equal results."""
    x = _x()
    host = kernels.histogram(x, bins)
    monkeypatch.setenv("TBPROBE_KERNELS", "triton")
    tri = kernels.histogram(x, bins)
    np.testing.assert_array_equal(tri.counts.numpy(), host.counts.numpy())
    np.testing.assert_array_equal(tri.edges.numpy(), host.edges.numpy())
    np.testing.assert_allclose(tri.stats.numpy(), host.stats.numpy(), rtol=1e-6)
    many = kernels.histogram_many([x, x[::2]], bins)
    np.testing.assert_array_equal(many[0].counts.numpy(), host.counts.numpy())
    rows = kernels.tensor_stats([x, x[:10]])
    np.testing.assert_allclose(rows[0].numpy(), host.stats.numpy(), rtol=1e-6)


def test_forced_torch_and_bad_value(monkeypatch):
    """TBPROBE_KERNELS=torch uses the reference; another value is a clear ValueError."""
    monkeypatch.setenv("TBPROBE_KERNELS", "torch")
    assert kernels.tensor_stats([_x()]).shape == (1, len(kernels.STAT_NAMES))
    monkeypatch.setenv("TBPROBE_KERNELS", "gpu")
    with pytest.raises(ValueError, match="TBPROBE_KERNELS"):
        kernels.histogram(_x())
