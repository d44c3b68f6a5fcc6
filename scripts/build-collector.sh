#!/usr/bin/env bash
# Builds the test collector (tests/collector: the otelcol-contrib components memtel's configs
# use) once, into a cache directory outside the repository, and prints the binary's path.
# The binary is named after a hash of go.mod, go.sum and the Go sources: unchanged sources
# reuse it (instant); a change builds a new one (≈ 6 minutes and ≈ 800 MB on 2 cores when
# Go's own caches are cold, seconds when they are warm).
#
#   scripts/build-collector.sh             # -> /root/.cache/memtel/otelcol-<hash>
#   MEMTEL_OTELCOL=$(scripts/build-collector.sh) cargo test --test collector_pipeline
#
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail

src="$(cd "$(dirname "$0")/../tests/collector" && pwd)"
cache="${MEMTEL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/memtel}"

if ! command -v go >/dev/null 2>&1; then
    if [ -x /usr/local/go/bin/go ]; then
        PATH="/usr/local/go/bin:$PATH"
    else
        echo "build-collector: no Go toolchain on PATH (go.mod needs $(sed -n 's/^go //p' "$src/go.mod") or newer)" >&2
        exit 1
    fi
fi

hash="$(cd "$src" && cat go.mod go.sum $(ls -- *.go | LC_ALL=C sort) | sha256sum | cut -c1-16)"
out="$cache/otelcol-$hash"
mkdir -p "$cache"

# One build at a time (test binaries may call this concurrently); the others wait, then reuse it.
exec 9>"$cache/otelcol.lock"
flock 9

if [ ! -x "$out" ]; then
    echo "build-collector: building $out (go build in $src)" >&2
    start=$(date +%s)
    tmp="$out.tmp.$$"
    trap 'rm -f "$tmp"' EXIT
    # GOTOOLCHAIN=local: never download a Go toolchain; -mod=readonly: go.sum is the truth.
    (cd "$src" && GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" \
        go build -trimpath -ldflags="-s -w" -o "$tmp" .)
    mv -f "$tmp" "$out"
    trap - EXIT
    # Older builds of other sources are of no further use.
    find "$cache" -maxdepth 1 -name 'otelcol-*' ! -name "otelcol-$hash" ! -name 'otelcol.lock' -type f -delete
    echo "build-collector: built in $(($(date +%s) - start))s ($(du -h "$out" | cut -f1))" >&2
fi

echo "$out"
