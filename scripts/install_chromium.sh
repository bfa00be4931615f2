#!/usr/bin/env bash
# Chromium for the screenshot test (tests/test_quickstart.py) and scripts/screenshot.py, from Debian's
# package when no browser is found and this is root with apt-get; otherwise it says how and carries on
# (the test is then skipped, or fails when CI=true). LIGHTCRL_SKIP_CHROMIUM=1 skips this step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${LIGHTCRL_SKIP_CHROMIUM:-0}" = 1 ]; then
  exit 0
fi
if browser=$("$PY" scripts/screenshot.py --find-browser 2>/dev/null); then  # the one list of browser names
  echo "chromium: $browser"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: no Chromium, so the screenshot test is skipped (and fails when CI=true);" \
    "install it with: sudo apt-get install -y chromium (or set \$CHROMIUM)"
  exit 0
fi
echo "installing chromium with apt-get for the screenshot test (LIGHTCRL_SKIP_CHROMIUM=1 skips this)"
export DEBIAN_FRONTEND=noninteractive
# without recommends: udev, upower, printer tools and mesa are not needed to render a page headless
if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
  echo "chromium: $("$PY" scripts/screenshot.py --find-browser)"
else
  echo "warning: apt-get install chromium failed; the screenshot test is skipped (fails when CI=true)"
fi
