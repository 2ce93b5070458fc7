#!/usr/bin/env bash
# Makes sure a headless Chromium is there for the web page's browser test (tests/service/test_web.py):
# Debian's `chromium` package, installed when missing. Playwright (a dev dependency) drives it; it
# downloads no browser of its own. Where it cannot be installed the test is skipped and says why.
set -euo pipefail

log() { echo "browser: $*" >&2; }

for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null; then log "$(command -v "$name") is there"; exit 0; fi
done
if ! command -v apt-get >/dev/null; then log "no Chromium and no apt-get: the browser test will be skipped"; exit 0; fi
log "installing chromium"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; then
    log "could not install chromium: the browser test will be skipped"
fi
