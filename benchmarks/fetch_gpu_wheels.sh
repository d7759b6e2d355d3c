#!/usr/bin/env bash
# Download, HERE (with network), the wheels that the GPU machine's image lacks, into .whl/.
#
# The device machine has Python 3.12 with torch, triton, numpy, protobuf, pillow and tensorboard,
# but no network and neither crc32c (a tbprobe dependency) nor tensorboardX (the baseline that
# benchmarks/bench_writer.py compares against). benchmarks/gpu_check.sh installs whatever lies in
# .whl/ with `pip install --no-index --no-deps --target /tmp/site`; the session carries the folder
# with run(carry=[".whl"]). .whl/ is git-ignored through .git/info/exclude: never commit wheels.
#
# Usage: bash benchmarks/fetch_gpu_wheels.sh      (idempotent; re-run after changing WHEELS)
set -euo pipefail
cd "$(dirname "$0")/.."

# name==version for Python 3.12, manylinux x86_64. One version of each: two stop the install.
WHEELS=(
    "crc32c==2.9.post0"  # tbprobe's dependency (pyproject: crc32c>=2.3)
    "tensorboardX==2.6.5"  # the comparison baseline; needs numpy, packaging, protobuf (in image)
)
# Requirements the GPU image already satisfies (device KINDS.md, "Python packages already
# there"); any other Requires-Dist of a wheel above must be fetched too, or this script fails.
IN_IMAGE="numpy packaging protobuf pillow torch triton tensorboard typing-extensions setuptools"

PY=${PYTHON:-python3}
DEST=.whl

exclude=.git/info/exclude
if [ -d .git ]; then
    mkdir -p .git/info
    touch "$exclude"
    grep -qxF '/.whl/' "$exclude" || echo '/.whl/' >>"$exclude"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The device README's command form, verbatim apart from the destination.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$tmp" "${WHEELS[@]}"

mkdir -p "$DEST"
norm() { echo "$1" | tr '[:upper:]' '[:lower:]' | tr '_.' '--'; }
for whl in "$tmp"/*.whl; do
    base=$(basename "$whl")
    project=$(norm "${base%%-*}")
    # Drop any other version of the same project, so exactly one stays.
    for old in "$DEST"/*.whl; do
        [ -e "$old" ] || continue
        [ "$(norm "$(basename "$old" | cut -d- -f1)")" = "$project" ] && rm -f "$old"
    done
    mv "$whl" "$DEST/"
done

# Every non-extra requirement must be in the image or among the wheels fetched.
have=" $IN_IMAGE "
for whl in "$DEST"/*.whl; do
    have+="$(norm "$(basename "$whl" | cut -d- -f1)") "
done
missing=0
for whl in "$DEST"/*.whl; do
    reqs=$("$PY" - "$whl" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            name = re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)", line).group(1)
            print(re.sub(r"[-_.]+", "-", name).lower())
PY
)
    for r in $reqs; do
        if [[ "$have" != *" $r "* ]]; then
            echo "fetch_gpu_wheels: $(basename "$whl") needs '$r', neither in the image nor in $DEST" >&2
            missing=1
        fi
    done
done

echo "wheels in $DEST (carry them with run(carry=[\".whl\"])):"
ls -l "$DEST"/*.whl
exit "$missing"
