#!/usr/bin/env bash
# Installs Debian's `chromium` for the end-to-end TensorBoard tests (tests/e2e), which take
# headless screenshots of the dashboards. Idempotent: does nothing when `chromium` is on PATH.
# Needs root (CI runs as root); elsewhere it says what to run and exits 1.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium.sh: no apt-get here; install a Chromium that provides \`chromium\`" \
    "on PATH (the e2e screenshot tests need it)" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_chromium.sh: not root; run: sudo apt-get install -y --no-install-recommends" \
    "chromium (the e2e screenshot tests need it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get install -y -q --no-install-recommends chromium; }
# A fresh image may have no package lists (or stale ones that 404): update, then retry once.
if ! apt-cache show chromium >/dev/null 2>&1 || ! apt_install; then
  apt-get update -q
  apt_install
fi
command -v chromium >/dev/null 2>&1 || {
  echo "install_chromium.sh: apt-get installed chromium but \`chromium\` is not on PATH" >&2
  exit 1
}
