"""Loading a benchmark script by its path, as a module, for the tests of ``benchmarks/``."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path


@contextlib.contextmanager
def loaded_script(path: Path, name: str):
    """The script at ``path`` executed as module ``name``, registered in ``sys.modules`` while
    in use (dataclasses look their module up there) and removed after."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)
