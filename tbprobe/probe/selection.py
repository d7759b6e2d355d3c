"""Which modules the probe hooks, and which tensors of a module's inputs/outputs it reads."""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch import nn

ROOT_NAME = "_root"  # tag name of the model itself (its qualified name is "")
_CONTAINERS = (nn.ModuleList, nn.Sequential)
_MAX_DEPTH = 4  # nesting of tuples/dicts/dataclasses searched for tensors


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def default_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Parameterised leaf modules plus the *blocks*: the children of ``ModuleList`` /
    ``Sequential`` containers that hold parameters (e.g. transformer layers), in
    ``named_modules`` order. A module below the root that owns parameters itself counts as
    parameterised even with children: ``nn.MultiheadAttention`` uses its ``in_proj_weight``
    and its ``out_proj``'s weight without calling ``out_proj``, so its own hook is the only
    one that sees the attention. (The root is hooked by default only as a leaf: its output
    is most often the logits or the loss.)"""
    blocks = set()
    for m in model.modules():
        if isinstance(m, _CONTAINERS):
            blocks.update(id(c) for c in m.children() if _has_params(c))
    out = []
    for name, m in model.named_modules():
        owns = any(p is not None for p in m._parameters.values())
        leaf = next(m.children(), None) is None
        if (owns and (leaf or name)) or id(m) in blocks:  # the root: as a leaf only
            out.append((name, m))
    return out


def _matches(name: str, m: nn.Module, patterns) -> bool:
    for p in patterns:
        if isinstance(p, str):
            if fnmatch.fnmatchcase(name, p):
                return True
        elif isinstance(m, p):
            return True
    return False


def select_modules(model: nn.Module, include=(), exclude=()) -> list[tuple[str, nn.Module]]:
    """``(tag_name, module)`` pairs to hook: ``include`` globs/types (default: see
    :func:`default_modules`) minus ``exclude``. A glob in ``include`` that matches nothing
    raises ValueError naming it.

    Example::

        select_modules(model, include=["transformer.h.*"], exclude=[nn.Dropout])
    """
    if include:  # the root is named as its tags name it, ROOT_NAME
        named = [(n or ROOT_NAME, m) for n, m in _clean_names(model.named_modules())]
        chosen = [(n, m) for n, m in named if _matches(n, m, include)]
        for p in include:
            if isinstance(p, str) and not any(fnmatch.fnmatchcase(n, p) for n, _ in named):
                raise ValueError(f"modules: the glob {p!r} matches no module of the model")
    else:
        chosen = [(n or ROOT_NAME, m) for n, m in _clean_names(default_modules(model))]
    return [(n, m) for n, m in chosen if not _matches(n, m, exclude)]


def clean_name(name: str) -> str:
    """A module's or parameter's name as the model's code writes it: a submodule compiled in
    place (``model.blocks[0] = torch.compile(block)``) puts ``_orig_mod`` in the names of
    what it holds.

    Example::

        clean_name("blocks.0._orig_mod.fc1.weight")  # "blocks.0.fc1.weight"
    """
    name = name.replace("._orig_mod.", ".").removesuffix("._orig_mod")
    if name.startswith("_orig_mod"):
        name = name[len("_orig_mod") :].lstrip(".")
    return name


def _clean_names(named) -> list[tuple[str, nn.Module]]:
    """Module names by :func:`clean_name`. The compiled wrapper keeps the name (its hook
    runs outside the compiled region), the module it wraps is dropped."""
    out, seen = [], set()
    for n, m in named:
        n = clean_name(n)
        if n not in seen:
            seen.add(n)
            out.append((n, m))
    return out


def floating_tensors(obj, depth: int = 0) -> list[torch.Tensor]:
    """The floating-point tensors inside ``obj``: a tensor, or tuples/lists/dicts/dataclasses
    of them (e.g. Hugging Face ``ModelOutput``), in order."""
    if type(obj) is tuple and len(obj) == 1 and isinstance(obj[0], torch.Tensor):
        obj = obj[0]  # a module's positional args, most often: the hot path
    if isinstance(obj, torch.Tensor):
        if obj.is_nested:  # e.g. nn.TransformerEncoder's fast path: its packed values
            obj = obj.values().detach()  # (a flat view; no gradient comes through it)
        return [obj] if obj.is_floating_point() and obj.numel() > 0 else []
    if depth >= _MAX_DEPTH:
        return []
    if isinstance(obj, (tuple, list)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name, None) for f in dataclasses.fields(obj)]
    else:
        return []
    out: list[torch.Tensor] = []
    for item in items:
        out.extend(floating_tensors(item, depth + 1))
    return out
