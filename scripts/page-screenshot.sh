#!/usr/bin/env bash
# Takes the README's screenshot of the live page (docs/memory-page.png): runs the page test,
# which drives Debian's headless Chromium over WebDriver, and saves what it shows.
#   scripts/page-screenshot.sh [output.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-docs/memory-page.png}")"
MEMTEL_PAGE_SCREENSHOT="$out" cargo test --test live_page -- --nocapture
echo "screenshot: $out"
