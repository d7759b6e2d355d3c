"""tbprobe: GPU-side statistics and model introspection for PyTorch, streamed to TensorBoard.

Importing the package is cheap: the writer, the probe (and torch) load on first use of
``SummaryWriter``, ``Probe`` or ``attach``.
"""

__version__ = "0.1.0"
__all__ = ["AnomalyError", "Probe", "SummaryWriter", "__version__", "attach"]


def __getattr__(name):
    if name == "SummaryWriter":
        from tbprobe.writer import SummaryWriter

        return SummaryWriter
    if name in ("Probe", "attach", "AnomalyError"):
        from tbprobe.probe import probe

        return getattr(probe, name)
    raise AttributeError(f"module 'tbprobe' has no attribute {name!r}")
