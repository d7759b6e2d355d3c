"""Host side of the Triton ``tensor_stats``: which tensors to read, and the cached launch plan.

The tensors are grouped by kernel variant (their dtype; bool and uint8 share one) and cut,
from ``numel`` alone (no sync), into chunks of ``BLOCK * CHUNK_BLOCKS`` elements (a tensor's
last chunk may be shorter; a zero-size tensor gets one empty chunk, so every output row has
a chunk that writes it). One int64 table describes the call, six numbers per chunk:
``(address, start, end, row, first, count)``: the tensor's base address, the element range,
the output row, and the range of chunks of that row.

A :class:`Plan` holds the table on the device, the partial-row buffer and the per-row
arrival counters the kernel's last-chunk fold uses (the kernel resets them to 0). It is cached
by the tensors' (dtype, address, numel), the chunk size and the stream: parameters and
gradients keep their addresses from step to step, so a repeated call allocates nothing but its
output and copies nothing to the device. On CUDA a new table goes through pinned memory with
one ``non_blocking`` copy, queued on the current stream: the host never waits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
import triton.language as tl

_CACHE_SIZE = 64
RECORD = 6  # int64 numbers per chunk in the table

# torch dtype -> (element type the kernel loads, accumulate in fp64). Narrow types widen to
# fp32 exactly; int32/int64/uint32/uint64 beyond 2^24 would round in fp32 (min/max would no
# longer be elements of the input), so they and fp64 take the fp64 path. fp64 keeps int64 as
# ``x.double()`` does: rounding is monotonic, so min/max equal the reference's.
ELEMENT = {
    torch.float32: (tl.float32, False),
    torch.float16: (tl.float16, False),
    torch.bfloat16: (tl.uint16, False),  # loaded as bits, decoded in the kernel (DECODE)
    torch.float8_e4m3fn: (tl.uint8, False),
    torch.float8_e5m2: (tl.uint8, False),
    torch.int8: (tl.int8, False),
    torch.int16: (tl.int16, False),
    torch.uint8: (tl.uint8, False),
    torch.bool: (tl.uint8, False),  # one byte holding 0 or 1
    torch.uint16: (tl.uint16, False),
    torch.float64: (tl.float64, True),
    torch.int32: (tl.int32, True),
    torch.int64: (tl.int64, True),
    torch.uint32: (tl.uint32, True),
    torch.uint64: (tl.uint64, True),
}
DECODE = {torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}  # else 0: a cast


class Plan(NamedTuple):
    table: torch.Tensor  # int64 (RECORD * n_chunks,) on the device
    partials: torch.Tensor  # float64 (n_chunks, 10): rows of tensors with several chunks
    counts: torch.Tensor  # int32 (n_rows,): chunks of each row done so far, 0 between calls
    groups: tuple  # (ELEM, ACC, DECODE, ALIGNED, first chunk, chunk count) per launch


_plans: OrderedDict = OrderedDict()
_plans_lock = threading.Lock()  # hooks may run on several threads (FSDP's streams)


def new_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Output/partial buffers; every element read is written by a kernel (tests poison it)."""
    return torch.empty(shape, dtype=torch.float64, device=device)


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr`` in some
    order (contiguous, transposed, permuted): statistics ignore order, so no copy is needed."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def source(t, i: int) -> torch.Tensor:
    """The tensor to read for ``tensors[i]``: itself (no op at all in the usual case), or a
    copy when it must be one. Only its address is read, so no ``detach`` is needed."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensors[{i}]: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ELEMENT:
        if t.is_complex():
            raise TypeError(f"tensors[{i}]: complex tensors are not supported (got {t.dtype})")
        t = t.detach().to(torch.float64)  # rare real dtypes (fp8 fnuz, e8m0): one widening copy
    if t.is_neg():
        t = t.detach().resolve_neg()  # a lazily negated view: its memory holds -t
    if not _is_dense(t) and t.numel():
        t = t.detach().contiguous()  # copy: views with gaps (x[::2]) or repeats (expand)
    return t


def _variant(dtype: torch.dtype) -> tuple:
    """The kernel's constexprs ``(ELEM, ACC, DECODE)`` for ``dtype``: dtypes that share them
    (bool and uint8) share a launch."""
    elem, wide = ELEMENT[dtype]
    return elem, tl.float64 if wide else tl.float32, DECODE.get(dtype, 0)


def build_table(sources: list[torch.Tensor], chunk: int):
    """Host int64 table ``(RECORD * n_chunks,)``, launch groups and ``n_chunks``, from
    shapes and addresses only (no sync)."""
    order: dict[tuple, list[int]] = {}
    for r, t in enumerate(sources):
        order.setdefault(_variant(t.dtype), []).append(r)
    rows = np.array([r for members in order.values() for r in members], dtype=np.int64)
    numel = np.array([sources[r].numel() for r in rows], dtype=np.int64)
    address = np.array([sources[r].data_ptr() for r in rows], dtype=np.int64)
    n_chunks = np.maximum(-(-numel // chunk), 1)  # a zero-size tensor: one empty chunk
    first = np.concatenate(([0], np.cumsum(n_chunks)))
    total = int(first[-1])
    owner = np.repeat(np.arange(len(rows)), n_chunks)  # chunk -> position in `rows`
    start = (np.arange(total, dtype=np.int64) - first[owner]) * chunk
    end = np.minimum(start + chunk, numel[owner])
    start = np.minimum(start, end)  # 0 for the empty chunk of a zero-size tensor
    fields = (address[owner], start, end, rows[owner], first[owner], n_chunks[owner])
    table = np.stack(fields, axis=1).reshape(-1)
    groups, pos = [], 0
    for variant, members in order.items():
        lo, hi = int(first[pos]), int(first[pos + len(members)])
        read = slice(pos, pos + len(members))
        aligned = bool(np.all((address[read] % 16 == 0) | (numel[read] == 0)))
        pos += len(members)
        groups.append((*variant, aligned, lo, hi - lo))
    return table, tuple(groups), total


def plan_for(sources: list[torch.Tensor], device: torch.device, chunk: int) -> Plan:
    """The device plan for these tensors, from the cache when their addresses and sizes
    repeat (gradients every step)."""
    key = (device, chunk, *[(t.dtype, t.data_ptr(), t.numel()) for t in sources])
    if device.type == "cuda":  # a table copied on one stream is only known ready on that one
        key += (torch.cuda.current_stream(device).cuda_stream,)
    with _plans_lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    host, groups, n_chunks = build_table(sources, chunk)
    table = torch.from_numpy(host)
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is queued on the stream, the host does not wait.
        # The caching host allocator keeps the pinned block until the copy has run.
        pinned = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        pinned.copy_(table)
        table = pinned.to(device, non_blocking=True)
    elif table.device != device:
        table = table.to(device)
    several = n_chunks > len(sources)  # some tensor has several chunks: partials are used
    partials = new_buffer((n_chunks if several else 1, 10), device)
    counts = torch.zeros(len(sources), dtype=torch.int32, device=device)
    plan = Plan(table, partials, counts, groups)
    with _plans_lock:
        _plans[key] = plan
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)  # the least recently used
    return plan
