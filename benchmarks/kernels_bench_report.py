"""How bench_kernels.py shows and judges its results: one markdown table per kernel (its
columns and their formats) and the GPU targets, each with its verdict.

Both read the rows ``Env.add`` collects in bench_kernels.py; the targets are judged on the
Triton rows of a CUDA run only (on CPU the values are shown, not judged).
"""

from __future__ import annotations

MiB = 1 << 20
TARGET_MB = 64  # bandwidth targets apply to inputs of at least this many MiB


def fmt_t(s) -> str:
    if s is None:
        return "—"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_x(slow, fast) -> str:
    return "—" if slow is None or fast is None else f"{slow / fast:.3g}×"


def _t(key):
    return lambda r: fmt_t(r[key])


def _speedup(key):
    return "speedup", lambda r: fmt_x(r[key], r["time_s"])


COMMON = [
    ("backend", lambda r: r["backend"]),
    ("time", _t("time_s")),
    ("GB/s", lambda r: f"{r['gbps']:.1f}"),
    ("× copy", lambda r: f"{r['x_copy']:.2f}"),
]
CASE, CHECK = ("case", lambda r: r["case"]), ("check", lambda r: r["check"])
# Left-aligned; the others right-aligned.
TEXT_COLUMNS = ("case", "bins", "chunk", "programs/SM", "backend", "check")
TABLES = {  # kernel: (title, columns)
    "stats": (
        "tensor_stats of one tensor (vs aminmax + sum + vector_norm + isnan/isinf sums)",
        [CASE, *COMMON, ("plain torch", _t("torch_s")), _speedup("torch_s"), CHECK],
    ),
    "histogram": (
        "histogram (vs aminmax + histc, and tensorboardX's .cpu().numpy() + np.histogram)",
        [CASE, ("bins", lambda r: r["bins"]), *COMMON, ("aminmax + histc", _t("torch_s"))]
        + [_speedup("torch_s"), ("tensorboardX", _t("tbx_s")), _speedup("tbx_s"), CHECK],
    ),
    "model": (
        "tensor_stats of a model's bf16 gradients (one read: _foreach_norm or one amax)",
        [CASE, *COMMON, ("back-to-back", _t("wall_s")), ("per-tensor torch", _t("torch_s"))]
        + [_speedup("torch_s"), ("_foreach_norm", _t("foreach_s")), ("amax", _t("amax_s"))]
        + [("÷ one read", lambda r: f"{r['time_s'] / r['read_once_s']:.2f}×"), CHECK],
    ),
    "stats_chunks": (
        "tensor_stats by chunk length (loop steps of 2048 elements a program reads; auto: "
        "chunk_blocks_for)",
        [CASE, ("chunk", lambda r: r["chunk"]), *COMMON, CHECK],
    ),
    "hist_programs": (
        "histogram by programs per SM (the launch's grid; TensorBoard bins and 64 bins)",
        [CASE, ("bins", lambda r: r["bins"]), ("programs/SM", lambda r: r["programs"])]
        + [*COMMON, CHECK],
    ),
    "thumbnail": (
        "thumbnail (GB/s of the maps drawn; vs adaptive_avg_pool2d of those maps)",
        [CASE, *COMMON, ("back-to-back", _t("wall_s")), ("adaptive_avg_pool2d", _t("torch_s"))]
        + [_speedup("torch_s"), CHECK],
    ),
}


def report(env) -> str:
    """The tables of ``env.rows`` (bench_kernels.py's ``Env``), one per kernel that has rows
    (the sweeps have none on the CPU), in order."""
    parts = []
    for kernel, (title, columns) in TABLES.items():
        rows = [r for r in env.rows if r["kernel"] == kernel]
        if not rows:
            continue
        lines = [f"### {title}", "", "| " + " | ".join(h for h, _ in columns) + " |"]
        lines.append(
            "|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h, _ in columns) + "|"
        )
        lines += ["| " + " | ".join(f(r) for _, f in columns) + " |" for r in rows]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def targets(env) -> list[dict]:
    """The GPU targets, judged on the Triton rows (on CPU the values are shown, not judged);
    a wrong result in scope fails its target."""
    rows = [r for r in env.rows if r["backend"] == "triton" or not env.cuda]
    for r in rows:
        r["read_ratio"] = r["time_s"] / r["read_once_s"] if "read_once_s" in r else None
        r["time_us"] = r["time_s"] * 1e6
        r["tbx_speedup"] = r["tbx_s"] / r["time_s"] if r.get("tbx_s") else None
    big, tf10m = TARGET_MB * MiB, ("fp32", 10_000_000, "tensorflow")
    specs = [  # (target, what is measured, rows in scope, key, aggregate, passes)
        ("stats ≥ 80% of copy bandwidth on inputs ≥ 64 MiB", "min × copy",
         [r for r in rows if r["kernel"] == "stats" and r["bytes"] >= big], "x_copy", min,
         lambda v: v >= 0.8),
        ("histogram ≥ 80% of copy bandwidth on inputs ≥ 64 MiB", "min × copy",
         [r for r in rows if r["kernel"] == "histogram" and r["bytes"] >= big], "x_copy", min,
         lambda v: v >= 0.8),
        ("bf16 gradient stats of a 1B-param model within 1.3× of one read", "÷ one read",
         [r for r in rows if r["kernel"] == "model"], "read_ratio", max, lambda v: v <= 1.3),
        ("thumbnails < 50 µs", "max µs",
         [r for r in rows if r["kernel"] == "thumbnail"], "time_us", max, lambda v: v < 50),
        ("10M fp32 histogram ≥ 1000× faster than the tensorboardX path", "speedup",
         [r for r in rows if (r.get("dtype"), r.get("numel"), r.get("bins")) == tf10m],
         "tbx_speedup", min, lambda v: v >= 1000),
    ]  # fmt: skip
    out = []
    for name, what, scope, key, pick, passes in specs:
        vals = [r[key] for r in scope if r[key] is not None]
        value = pick(vals) if vals else None
        if not env.cuda:
            verdict = "n/a on cpu"
        elif not rows:
            verdict = "n/a (triton backend not run)"
        elif value is None:
            verdict = "n/a (no case in scope)"
        elif any(r["check"] != "ok" for r in scope):
            verdict = "FAIL (wrong result)"
        else:
            verdict = "PASS" if passes(value) else "FAIL"
        out.append(dict(target=name, measure=what, value=value, verdict=verdict))
    return out
