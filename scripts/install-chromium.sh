#!/usr/bin/env bash
# Installs Debian's `chromium` and `chromium-driver` (chromedriver) unless already on PATH, and prints the binary's path.
# Used by tests/live_page.rs and .ci/run; needs root (or sudo) for apt-get.
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail

if path="$(command -v chromium)" && command -v chromedriver >/dev/null 2>&1; then
    echo "$path"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo -n"
    else
        echo "install-chromium: chromium is missing and installing it needs root (apt-get install chromium)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
lock="${TMPDIR:-/tmp}/memtel-install-chromium.lock"
exec 9>"$lock"
flock 9
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    start=$(date +%s)
    if ! apt-cache show chromium >/dev/null 2>&1; then
        $sudo apt-get update -qq >&2
    fi
    $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2 \
        || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2; }
    echo "install-chromium: installed in $(($(date +%s) - start))s" >&2
fi
command -v chromium
