#!/usr/bin/env bash
# Installs Debian's `prometheus` (2.42 on bookworm, with `promtool`) unless a `prometheus`
# binary is already on PATH, and prints the binary's path. Used by tests/collector_pipeline.rs
# and .ci/run; needs root (or sudo) for apt-get. Only the binary is used: the tests run it
# themselves with their own --config.file, --storage.tsdb.path and --web.listen-address (the
# package's service is not needed and, in containers without systemd, does not start anyway).
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail
exec "$(dirname "$0")/install-debian-packages.sh" install-prometheus "prometheus promtool" prometheus
