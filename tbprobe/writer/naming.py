"""Validation of what users pass as tags, steps, wall times and run names."""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
import time

import numpy as np

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


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # TensorBoard's Event.step is an int64


def check_tag(tag, name: str = "tag") -> str:
    """A tag written as given (the methods where tensorboardX does not clean tags): a non-empty
    str of at most ``MAX_TAG_LENGTH`` characters, encodable as UTF-8."""
    if not isinstance(tag, str):
        raise TypeError(f"{name}: expected a str, got {type(tag).__name__}")
    if not tag:
        raise ValueError(f"{name}: must not be empty")
    if len(tag) > MAX_TAG_LENGTH:
        raise ValueError(f"{name}: longer than {MAX_TAG_LENGTH} characters ({len(tag)})")
    try:
        tag.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: not encodable as UTF-8: {tag!r}") from None
    return tag


def _check_step(step, name="global_step"):
    """``None``, or the step as tensorboardX takes it (``int(step)``: 2.5 -> 2, ``True`` -> 1, a
    one-element host tensor or array -> its value), checked to fit TensorBoard's int64.

    Raises TypeError for a non-number (or a float tensor on a device, which could only be read
    by waiting for the device) and ValueError for NaN, infinity or a step outside int64."""
    if step is None:
        return None
    if type(step) is not int:
        step = _step_to_int(step, name)
    if not INT64_MIN <= step <= INT64_MAX:
        raise ValueError(f"{name}: must lie in [-2**63, 2**63 - 1] (int64), got {step}")
    return step


def _step_to_int(step, name: str) -> int:
    from tbprobe.writer.values import is_device_tensor, is_tensor

    try:
        return operator.index(step)  # ints, numpy ints, bool, integer tensors and 0-d arrays
    except TypeError:
        pass
    if isinstance(step, np.bool_):
        return int(step)
    if isinstance(step, numbers.Real):
        value = float(step)
    elif is_tensor(step) or isinstance(step, np.ndarray):
        if is_device_tensor(step):
            raise TypeError(
                f"{name}: a {step.dtype} tensor on {step.device} cannot be read without waiting "
                "for the device; pass a Python int"
            )
        if is_tensor(step):
            kind = "c" if step.is_complex() else "f" if step.is_floating_point() else "i"
        else:
            kind = step.dtype.kind
        if kind not in "fiub" or step.shape and math.prod(step.shape) != 1:
            raise TypeError(f"{name}: expected a number, got {_describe(step)}")
        value = float(step.reshape(()))
    else:
        raise TypeError(f"{name}: expected an int, got {type(step).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return int(value)


def _describe(value) -> str:
    shape = tuple(getattr(value, "shape", ()))
    return f"{type(value).__name__} of dtype {value.dtype} and shape {shape}"


def _check_walltime(walltime):
    if walltime is None:
        return time.time()
    try:
        w = float(walltime)
    except (TypeError, ValueError):
        raise TypeError(f"walltime: expected a number, got {type(walltime).__name__}") from None
    except OverflowError:  # an int beyond float's range
        w = math.inf
    if not math.isfinite(w):  # TensorBoard's data server marks a file with NaN wall time dead
        raise ValueError(f"walltime: must be finite, got {walltime!r}")
    return w
