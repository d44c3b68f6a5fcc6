#!/usr/bin/env bash
# Installs Debian's `chromium` and `chromium-driver` (chromedriver) unless both are on PATH,
# and prints chromium's path. Used by tests/live_page.rs and .ci/run; needs root (or sudo).
# Progress goes to stderr; stdout carries only the path.
set -euo pipefail
exec "$(dirname "$0")/install-debian-packages.sh" install-chromium "chromium chromedriver" chromium chromium-driver
