#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step_* functions are run indirectly, by run_step
# tbprobe's prepared GPU check: one command for a fresh GPU machine with no network, < 8 minutes.
#
# How a session runs it with the device tool (15 minutes of device time per session, all tries):
#   1. HERE, with network:  bash benchmarks/fetch_gpu_wheels.sh
#      (puts crc32c and tensorboardX wheels for Python 3.12 into the git-ignored .whl/)
#   2. device tool:         run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#      then give_back, unless you rerun at once. The reply's output_tail ends with the summary
#      table; the files of $OUT come back under files_at.
#   3. commit $OUT/summary.md as benchmarks/results/<date>-h100.md (<date> = YYYY-MM-DD; say
#      h200 if the reply's device was an H200). Never commit .whl/.
#   4. read the tuning sweeps in summary.md and keep the fastest launch shapes: the chunk
#      lengths of "tensor_stats by chunk length" (the "auto" row is chunk_blocks_for's pick:
#      _PER_SM and _MAX_CHUNK_BLOCKS in tbprobe/kernels/triton_stats.py) and the grid of
#      "histogram by programs per SM" (PROGRAMS_PER_SM in triton_histogram.py);
#      profile_probe's tables say which kernels the probe adds to a GPT-2 step. tensor_stats
#      adds x in fp64 per element since 2026-12-07 (fp32 partials missed the issue's 1e-6
#      relative sums): compare its fp32/bf16 GB/s with the 2026-11-27 table; if bf16 fell
#      well below it, the extra conversion made it issue-bound (a compensated fp32 sum is
#      the cheaper alternative).
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--quick]      (or: make gpu-check)
#   --dry-run  no GPU needed: every step runs on the CPU (CI runs this through
#              tests/test_gpu_check.py); uses .venv/bin/python when there is one.
#   --quick    smaller catalogues and benchmark cases.
#   PYTHON=... picks the interpreter (default python3, the one holding torch on the GPU image).
#
# Each step runs with its own timeout inside an overall budget (GPU_CHECK_BUDGET_S, default 470 s),
# a failing step never stops the next, and every step's status (PASS, FAIL, TIMEOUT, SKIP, or
# NOT RUN when the budget is spent) and time are recorded. Written to
# $OUT (./gpu_check_out when OUT is unset), at most 8 files as the device tool returns no more:
#   summary.md    the table (step, status, time, key numbers), failures, benchmark tables
#   summary.json  the same, machine-readable
#   steps.log     every step's output
#   <step>.json   one per heavy step: gpu_checks.json, bench_kernels.json, bench_writer.json,
#                 bench_probe.json, bench_diagnose.json
# The summary table is printed last. Exit status: 0 if every step passed or was skipped, else 1.
set -uo pipefail # no -e: one failing step must not stop the others

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

DRY_RUN=0
QUICK=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --quick) QUICK=1 ;;
        -h | --help)
            sed -n '3,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run, --quick)" >&2
            exit 2
            ;;
    esac
done

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif ((DRY_RUN)) && [[ -x .venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
rm -f "$OUT"/{summary.md,summary.json,steps.log,gpu_checks.json,bench_kernels.json,bench_writer.json,bench_probe.json,bench_diagnose.json}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
SITE=${TBPROBE_SITE:-/tmp/site} # where the carried wheels are installed (not in a dry run)
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
if ((DRY_RUN)); then
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 OUT PY DRY_RUN QUICK SITE ROOT SCRATCH # steps run in child shells
unset TRITON_INTERPRET TBPROBE_KERNELS # the default dispatch is what is checked and timed

# ----------------------------------------------------------------------------- the steps
# "name timeout_s": step_<name> below runs it. A step prints "KEY: ..." lines for the summary's
# key numbers (else they come from its JSON's "targets" or its PASS/FAIL lines), returns 77 to
# say "skipped", and writes at most one file, $OUT/<name>.json.
STEPS=(
    "wheels 60"
    "environment 60"
    "gpu_checks 240"
    "probe_nosync 90"
    "bench_kernels 200"
    "bench_probe 120"
    "bench_diagnose 120"
    "bench_writer 90"
    "profile_probe 60"
    # (8 files at most come back from the GPU machine: $OUT holds exactly 8.)
)

step_wheels() {
    if ((DRY_RUN)); then
        echo "dry run: this environment's packages are used; .whl/ is not installed"
        return 77
    fi
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in .whl/: run 'bash benchmarks/fetch_gpu_wheels.sh' here, carry [\".whl\"]"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" || return 1
    local names
    names=$(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1,2; done | paste -sd ' ' -)
    echo "KEY: installed into $SITE: $names"
}

step_environment() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    elif ((DRY_RUN)); then
        echo "nvidia-smi: not found (dry run)"
    else
        echo "nvidia-smi: not found"
        return 1
    fi
    "$PY" - "$DRY_RUN" <<'PY'
import platform
import sys

import torch

try:
    import triton

    tv = triton.__version__
except ImportError:
    tv = "not installed"
try:
    import tbprobe

    tb = tbprobe.__version__
except Exception as e:  # e.g. crc32c missing: the wheels step says why
    tb = f"import failed: {e!r}"
cuda = torch.cuda.is_available()
dev = torch.cuda.get_device_name() if cuda else "no CUDA device"
py = platform.python_version()
print(f"python {py} ({sys.executable}); torch {torch.__version__} (CUDA {torch.version.cuda})")
print(f"triton {tv}; tbprobe {tb}; torch.cuda.get_device_name(): {dev}")
print(f"KEY: {dev}; python {py}, torch {torch.__version__}, triton {tv}")
sys.exit(0 if (cuda or sys.argv[1] == "1") and not tb.startswith("import failed") else 1)
PY
}

step_gpu_checks() {
    local args=(--json "$OUT/gpu_checks.json")
    if ((DRY_RUN)); then args+=(--dry-run); fi
    if ((QUICK)); then args+=(--quick); fi
    "$PY" benchmarks/gpu_checks.py "${args[@]}"
}

step_bench_kernels() {
    if [[ ! -f benchmarks/bench_kernels.py ]]; then
        echo "benchmarks/bench_kernels.py not found"
        return 77
    fi
    local args=(--json "$OUT/bench_kernels.json")
    if ((DRY_RUN)); then
        args+=(--device cpu --quick)
    else
        args+=(--device cuda)
        if ((QUICK)); then args+=(--quick); fi
    fi
    "$PY" benchmarks/bench_kernels.py "${args[@]}"
}

step_bench_writer() {
    "$PY" benchmarks/bench_writer.py --quick --json "$OUT/bench_writer.json"
}

step_bench_probe() {
    local args=(--json "$OUT/bench_probe.json")
    if ((DRY_RUN)); then
        args+=(--device cpu --quick)
    else
        # 3 rounds: each window sits between two no-probe windows, ~the time 5 rounds took.
        # Not the tensorboardX loop (+6466% on 2026-11-27, 3.7 s a step): ~30 s of the limit.
        args+=(--device cuda --repeats 3 --configs none,tbprobe,tbprobe-grads,floor,tbprobe+hist)
        if ((QUICK)); then args+=(--quick); fi
    fi
    "$PY" benchmarks/bench_probe.py "${args[@]}"
}

step_profile_probe() {
    # Where the probe's time goes on the GPU: kernels per step with and without it. Printed
    # only (its tables reach summary.md); last, as the least needed.
    local args=()
    if ((DRY_RUN)); then
        args+=(--device cpu --quick --steps 1 --configs none,tbprobe)
    else
        args+=(--device cuda)
        if ((QUICK)); then args+=(--quick); fi
    fi
    "$PY" benchmarks/profile_probe.py "${args[@]}"
}

step_probe_nosync() {
    # The probe on four zoo models under set_sync_debug_mode("error"); its tags are checked.
    local out=$SCRATCH/probe_nosync.json
    if ((DRY_RUN)); then export DEVICE=cpu; fi
    BENCH_N=20 "$PY" -m tests.probe.gpu_probe_check >"$out" || return 1
    cat "$out"
    "$PY" - "$out" <<'PY'
import json
import sys

doc = json.load(open(sys.argv[1]))
models = {k: v for k, v in doc.items() if isinstance(v, dict) and "sync_error" in v}
bad = [k for k, v in models.items() if v["sync_error"] or v["probe_errors"] or not v["param_norm_ok"]]
ms = doc.get("bench_ms")
extra = f"; 8-layer bf16 conv net ms/step {ms}" if ms else ""
print(f"KEY: {len(models) - len(bad)}/{len(models)} models without a host sync{extra}")
sys.exit(1 if bad or not models else 0)
PY
}

step_bench_diagnose() {
    local args=(--json "$OUT/bench_diagnose.json")
    if ((DRY_RUN)); then
        args+=(--device cpu --quick)
    else
        args+=(--device cuda --quick) # MLP and CNN only: within the step's time
    fi
    "$PY" benchmarks/bench_diagnose.py "${args[@]}"
}

# ----------------------------------------------------------------------------- the runner

elapsed() { echo $((SECONDS - START)); }

run_step() {
    local name=$1 limit=$2 left log t0 t1 rc status secs
    log=$SCRATCH/$name.log
    left=$((BUDGET_S - $(elapsed) - 15)) # 15 s kept for the summary
    if ((left < 20)); then
        echo "not run: the ${BUDGET_S} s budget is spent" | tee "$log" | tee -a "$OUT/steps.log"
        printf '%s\tNOT RUN\t-\t0.0\t%s\n' "$name" "$limit" >>"$SCRATCH/steps.tsv"
        return
    fi
    ((limit > left)) && limit=$left
    printf '\n===== step %s (timeout %ss) =====\n' "$name" "$limit" | tee -a "$OUT/steps.log"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "step_$name"); step_$name" 2>&1 |
        tee "$log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    cat "$log" >>"$OUT/steps.log"
    case $rc in
        0) status=PASS ;;
        77) status=SKIP ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '===== step %s: %s (exit %s) in %s s =====\n' "$name" "$status" "$rc" "$secs" |
        tee -a "$OUT/steps.log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" >>"$SCRATCH/steps.tsv"
}

START=$SECONDS
STARTED_AT=$(date -u +"%Y-%m-%d %H:%M UTC")
: >"$SCRATCH/steps.tsv"
: >"$OUT/steps.log"
echo "gpu_check: dry_run=$DRY_RUN quick=$QUICK python=$PY OUT=$OUT budget=${BUDGET_S}s"
for entry in "${STEPS[@]}"; do
    read -r name limit <<<"$entry"
    run_step "$name" "$limit"
done

# ----------------------------------------------------------------------------- the summary
# Written by Python (tables, JSON); the table is printed last. A bash fallback prints the
# statuses if that fails.
"$PY" - "$SCRATCH" "$OUT" "$STARTED_AT" "$(elapsed)" "$DRY_RUN" "$QUICK" <<'PY'
import json
import os
import re
import sys

scratch, out, started, total, dry, quick = sys.argv[1:7]
steps = []
with open(os.path.join(scratch, "steps.tsv")) as f:
    for line in f:
        name, status, rc, secs, limit = line.rstrip("\n").split("\t")
        steps.append(dict(name=name, status=status, rc=rc, seconds=float(secs), timeout_s=limit))


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gpu_checks_key(doc):
    s = doc.get("summary") or {}
    checks = doc.get("checks", [])
    nosync = [c for c in checks if c["section"] == "nosync_kernels" or "no sync" in c["name"]]
    big = [c for c in checks if c["section"] == "big"]
    parts = [f"{s.get('checks', 0)} checks: {s.get('pass', 0)} passed, {s.get('fail', 0)} failed"]
    big_label = "2^31+17 elements"
    if any("stand-in" in c["name"] for c in big):
        big_label += " (dry run: a 4113-element stand-in)"
    for label, rows in (("no-sync", nosync), (big_label, big)):
        ran = [c for c in rows if c["status"] != "skip"]
        ok = sum(c["status"] == "pass" for c in ran)
        parts.append(f"{label} {ok}/{len(ran)}" if ran else f"{label} skipped")
    return "; ".join(parts)


def targets_key(doc, log):
    verdicts = []
    targets = doc.get("targets") if isinstance(doc, dict) else None
    if isinstance(targets, list) and targets:
        for t in targets:
            if not isinstance(t, dict):
                continue
            if isinstance(t.get("pass"), bool):
                verdicts.append(("PASS" if t["pass"] else "FAIL", str(t.get("target", ""))))
            else:
                v = str(t.get("verdict", "")).split()[0:1] or ["?"]
                verdicts.append((v[0], str(t.get("target", ""))))
    else:
        for line in log.splitlines():
            m = re.match(r"^\W*(PASS|FAIL)\b\W*(.*)", line)
            if m:
                verdicts.append((m.group(1), m.group(2)))
    if not verdicts:
        return ""
    n_pass = sum(v == "PASS" for v, _ in verdicts)
    fails = [t for v, t in verdicts if v == "FAIL"]
    other = len(verdicts) - n_pass - len(fails)
    key = f"targets: {n_pass} PASS, {len(fails)} FAIL" + (f", {other} n/a" if other else "")
    if fails:
        key += " (FAIL: " + "; ".join(f[:60] for f in fails[:3]) + ")"
    return key


def key_numbers(step):
    log = read(os.path.join(scratch, step["name"] + ".log"))
    keys = [line[5:].strip() for line in log.splitlines() if line.startswith("KEY: ")]
    if keys:
        return "; ".join(keys)
    doc = load(os.path.join(out, step["name"] + ".json"))
    if step["name"] == "gpu_checks" and isinstance(doc, dict):
        return gpu_checks_key(doc)
    key = targets_key(doc, log)
    if key:
        return key
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:100] if lines else ""


for step in steps:
    step["key"] = key_numbers(step).replace("|", "/")
    step["log_tail"] = read(os.path.join(scratch, step["name"] + ".log"))[-2000:]
ok = all(s["status"] in ("PASS", "SKIP") for s in steps)
flags = " ".join(f for f, on in (("--dry-run", dry == "1"), ("--quick", quick == "1")) if on)
command = "bash benchmarks/gpu_check.sh" + (f" {flags}" if flags else "")
head = [
    f"# tbprobe GPU check, {started}",
    "",
    f"`{command}`: **{'PASS' if ok else 'FAIL'}** in {total} s "
    f"({'dry run on the CPU' if dry == '1' else 'on the GPU'}).",
    "",
]
table = ["| step | status | time | key numbers |", "|---|---|---:|---|"]
table += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} s | {s['key']} |" for s in steps]

details = []
gc = load(os.path.join(out, "gpu_checks.json"))
if isinstance(gc, dict):
    failed = [c for c in gc.get("checks", []) if c["status"] == "fail"]
    if failed:
        details += ["", f"## gpu_checks failures ({len(failed)})", ""]
        details += [f"- `{c['section']}/{c['name']}`: {c['detail'][:300]}" for c in failed[:30]]
for step in steps:  # the benchmarks' own markdown: headings, tables, target lines
    if not step["name"].startswith("bench_"):
        continue
    md = [
        line
        for line in read(os.path.join(scratch, step["name"] + ".log")).splitlines()
        if line.startswith(("|", "## ", "### ", "- PASS", "- FAIL", "- n/a"))
    ]
    if md:
        details += ["", f"## {step['name']}", ""]
        for line in md:  # blank lines around headings and between a table and a list
            if details[-1] != "" and (line[0] == "#" or line[0] != details[-1][0]):
                details.append("")
            details.append(line)
            if line.startswith("#"):
                details.append("")
files = sorted(set(os.listdir(out)) | {"summary.md", "summary.json"})
warn = []
if len(files) > 8:
    warn = [f"WARNING: {len(files)} files in {out}; the device tool returns at most 8: {files}"]

with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(head + table + details + ([""] + warn if warn else [])) + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    doc = dict(started=started, total_s=int(total), command=command, ok=ok, steps=steps,
               files=files)
    json.dump(doc, f, indent=1)
print("\n".join(details + [""] + warn + [""] + head + table))
PY
summary_rc=$?
if ((summary_rc != 0)); then
    echo "gpu_check: the summary failed (exit $summary_rc); the steps:"
    while IFS=$'\t' read -r name status rc secs limit; do
        printf '| %s | %s | exit %s | %s s | timeout %s s |\n' "$name" "$status" "$rc" "$secs" "$limit"
    done <"$SCRATCH/steps.tsv"
fi

if ((summary_rc != 0)) || cut -f2 "$SCRATCH/steps.tsv" | grep -qE 'FAIL|TIMEOUT|NOT RUN'; then
    exit 1
fi
exit 0
