"""tbprobe: GPU-side statistics and model introspection for PyTorch, streamed to TensorBoard.

Importing the package is cheap: the writer (and torch) load on first use of ``SummaryWriter``.
"""

__version__ = "0.1.0"
__all__ = ["SummaryWriter", "__version__"]


def __getattr__(name):
    if name == "SummaryWriter":
        from tbprobe.writer import SummaryWriter

        return SummaryWriter
    raise AttributeError(f"module 'tbprobe' has no attribute {name!r}")
