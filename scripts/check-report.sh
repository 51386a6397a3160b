#!/bin/sh
# Renders a report.html with headless Chromium and checks that it holds its sections.
# Usage: scripts/check-report.sh evaluation/report.html [out.png]
# Writes a full-page screenshot (default: beside the report, report.png) to look at. Without
# Chromium (Debian: apt install chromium) it only checks the sections.
set -eu
report=${1:?usage: check-report.sh REPORT.html [OUT.png]}
png=${2:-${report%.html}.png}
for section in Settings Features Accuracy "Changes against Base" "Items that flip"; do
    grep -q "<h2>$section</h2>" "$report" || { echo "check-report: $report has no \"$section\" section" >&2; exit 1; }
done
if grep -q -E '<script|src="https?:' "$report"; then
    echo "check-report: $report is not self-contained" >&2
    exit 1
fi
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "check-report: sections present; no Chromium to render with (apt install chromium)"
    exit 0
fi
abs=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
# Offline: no network is needed, so any request would be a bug in the report.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,6000 \
    --screenshot="$png" "file://$abs" >/dev/null 2>&1
dom=$("$browser" --headless --no-sandbox --disable-gpu --dump-dom "file://$abs" 2>/dev/null)
echo "$dom" | grep -q "Changes against Base" || { echo "check-report: Chromium did not render the report" >&2; exit 1; }
echo "check-report: rendered $(echo "$dom" | grep -c '<svg') inline plots; screenshot $png"
