#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium`), for the tests that render pages a person reads (the report
# card, the monitoring console); they skip, saying why, where /usr/bin/chromium is absent.
# As root, rerun-safe. The flags it needs as root in a container: tests/browser.py.
set -euo pipefail
"$(dirname "$0")/apt_install.sh" install_chromium chromium
chromium --version 2>/dev/null  # its launcher warns about /dev/shm on stderr; the tests pass --disable-dev-shm-usage
