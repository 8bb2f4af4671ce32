#!/usr/bin/env bash
# System packages the test suite uses beyond the Python venv, for a clean Debian/Ubuntu CI
# machine. Today: headless Chromium for the web page test (tests/test_serving_http.py, which
# skips with a message when no Chromium is found). Idempotent; needs root or sudo.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    echo "chromium: $(command -v chromium || command -v chromium-browser)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install chromium" >&2; exit 1; }
    SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
chromium --version
