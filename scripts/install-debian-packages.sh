#!/usr/bin/env bash
# Installs Debian packages unless the commands they provide are already on PATH, and prints
# the first command's path. Shared by install-prometheus.sh and install-chromium.sh.
#   scripts/install-debian-packages.sh NAME "COMMAND..." PACKAGE...
# NAME prefixes messages; every COMMAND must be on PATH afterwards. Needs root (or sudo) for
# apt-get. Concurrent callers (test binaries) wait for each other on one lock per NAME.
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail
name=$1
read -r -a commands <<< "$2"
shift 2
packages=("$@")

present() {
    for c in "${commands[@]}"; do command -v "$c" >/dev/null 2>&1 || return 1; done
}

if present; then
    command -v "${commands[0]}"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo -n"
    else
        echo "$name: ${commands[*]} missing and installing it needs root (apt-get install ${packages[*]})" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
lock="${TMPDIR:-/tmp}/memtel-$name.lock"
exec 9>"$lock"
flock 9
if ! present; then
    start=$(date +%s)
    if ! apt-cache show "${packages[0]}" >/dev/null 2>&1; then
        $sudo apt-get update -qq >&2
    fi
    $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2 \
        || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2; }
    echo "$name: installed in $(($(date +%s) - start))s" >&2
fi
command -v "${commands[0]}"
