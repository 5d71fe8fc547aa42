#!/usr/bin/env bash
# Plan Mixtral-8x7B from its config with measured popularity, write the HTML report, and render it
# in headless Chromium (Debian's `chromium` package) to a PNG to look at.
#   bash examples/render_report.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/fiddlerc-report}"
mkdir -p "$out"
python -m fiddlerc plan tests/data/mixtral-8x7b-config.json --gpu-memory 24GiB --context 512 \
  --popularity tests/data/mixtral-8x7b-popularity/mixtral_8x7b_instruct-high_school_us_history.json \
  --html "$out/report.html" | tail -3
if command -v chromium >/dev/null; then
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1000,1400 \
    --screenshot="$out/report.png" "file://$(realpath "$out/report.html")" 2>/dev/null
  echo "screenshot: $out/report.png"
else
  echo "no chromium: open $out/report.html in a browser"
fi
