#!/usr/bin/env bash
# Installs Debian's `prometheus` (2.42 on bookworm) unless a `prometheus` binary is already on
# PATH, and prints the binary's path. Used by tests/collector_pipeline.rs and .ci/run; needs root
# (or sudo) for apt-get. Only the binary is used: the tests run it themselves with their own
# --config.file, --storage.tsdb.path and --web.listen-address (the package's service is not
# needed and, in containers without systemd, does not start anyway).
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail

if path="$(command -v prometheus)"; then
    echo "$path"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo -n"
    else
        echo "install-prometheus: prometheus is missing and installing it needs root (apt-get install prometheus)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Concurrent callers (test binaries) wait for each other on one lock.
lock="${TMPDIR:-/tmp}/memtel-install-prometheus.lock"
exec 9>"$lock"
flock 9
if ! command -v prometheus >/dev/null 2>&1; then
    start=$(date +%s)
    if ! apt-cache show prometheus >/dev/null 2>&1; then
        $sudo apt-get update -qq >&2
    fi
    # The package's service is not needed: the tests start the binary themselves.
    $sudo apt-get install -y -qq --no-install-recommends prometheus >&2 \
        || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq --no-install-recommends prometheus >&2; }
    echo "install-prometheus: installed in $(($(date +%s) - start))s" >&2
fi
command -v prometheus
