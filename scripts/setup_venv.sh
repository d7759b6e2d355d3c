#!/usr/bin/env bash
# Creates .venv with everything tbprobe needs to run its demo and its tests.
# Where no NVIDIA GPU is visible, torch is pinned to the CPU build first, so that resolving
# tbprobe's own `torch` requirement never pulls a multi-GB CUDA wheel.
# Override the torch requirement with TBPROBE_TORCH (e.g. TBPROBE_TORCH="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.tbprobe-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TBPROBE_TORCH:-}" ]; then
    pip_install "$TBPROBE_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch>=2.4"
  else
    # the CPU build on a machine without a GPU, and the Triton whose interpreter CI tests with
    # (triton 3.9's interpreter rejects a mask dtype the thumbnail kernel uses: see the notes)
    pip_install "torch==2.13.0" "triton==3.8.0"
  fi
fi
pip_install -e ".[dev]"
# The generated *_pb2.py must work under the oldest and the newest protobuf we support; the
# tests import them under each of these, kept apart from the venv's own protobuf.
pip_install --target "$VENV/protobuf-oldest" --upgrade "protobuf==4.25.8"
pip_install --target "$VENV/protobuf-newest" --upgrade "protobuf>=7,<8"
touch "$stamp"
