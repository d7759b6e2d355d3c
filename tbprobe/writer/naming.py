"""Validation of what users pass as tags, steps, wall times and run names."""

from __future__ import annotations

import math
import os
import re
import time

_INVALID_TAG_CHARS = re.compile(r"[^-/\w.]")
MAX_TAG_LENGTH = 4096


def clean_tag(tag, name: str = "tag") -> str:
    """tensorboardX's tag rule: characters other than ``[-/\\w.]`` become ``_``, leading ``/``
    are stripped. Raises TypeError for a non-str and ValueError for an empty or huge tag."""
    if not isinstance(tag, str):
        raise TypeError(f"{name}: expected a str, got {type(tag).__name__}")
    if len(tag) > MAX_TAG_LENGTH:
        raise ValueError(f"{name}: longer than {MAX_TAG_LENGTH} characters ({len(tag)})")
    cleaned = _INVALID_TAG_CHARS.sub("_", tag).lstrip("/")
    if not cleaned:
        raise ValueError(f"{name}: must contain a character other than '/', got {tag!r}")
    return cleaned


def safe_subdir(logdir: str, parts, name: str) -> str:
    """A relative directory under ``logdir`` built from untrusted ``parts``; never escapes it."""
    comps = []
    for p in parts:
        if not isinstance(p, str):
            raise TypeError(f"{name}: expected a str, got {type(p).__name__}")
        for c in re.split(r"[/\\]", p.replace("\x00", "_")):
            if c in ("", "."):
                continue
            c = "__" if c == ".." else c
            if len(c.encode("utf-8", "surrogatepass")) > 255:  # NAME_MAX on every common FS
                raise ValueError(
                    f"{name}: a path component is longer than 255 bytes: {c[:40]!r}..."
                )
            comps.append(c)
    rel = os.path.join(*comps) if comps else "_"
    root = os.path.realpath(logdir)
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, full]) != root:  # e.g. a symlink inside logdir
        raise ValueError(f"{name}: {'/'.join(parts)!r} leads outside log_dir")
    return rel


def _check_step(step, name="global_step"):
    if step is None:
        return None
    if isinstance(step, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return step.__index__()
    except (AttributeError, TypeError):
        raise TypeError(f"{name}: expected an int, got {type(step).__name__}") from None


def _check_walltime(walltime):
    if walltime is None:
        return time.time()
    try:
        w = float(walltime)
    except (TypeError, ValueError):
        raise TypeError(f"walltime: expected a number, got {type(walltime).__name__}") from None
    if not math.isfinite(w):  # TensorBoard's data server marks a file with NaN wall time dead
        raise ValueError(f"walltime: must be finite, got {walltime!r}")
    return w
