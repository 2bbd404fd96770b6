#!/usr/bin/env bash
# Debian's headless Chromium, for the tests that render a page a person reads (the report card):
# they skip, saying why, where /usr/bin/chromium is absent. As root on Debian 12; rerun-safe.
#
#   sudo workflow/ci/install_chromium.sh
set -euo pipefail

[ -x /usr/bin/chromium ] && { echo "install_chromium: chromium $(dpkg-query -W -f='${Version}' chromium) already installed"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "install_chromium: error: run as root (it installs a Debian package)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends chromium > /tmp/install_chromium_apt.log 2>&1 || {
    apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends chromium \
        > /tmp/install_chromium_apt.log 2>&1; } \
    || { echo "install_chromium: error: apt-get install failed: /tmp/install_chromium_apt.log" >&2; exit 1; }
echo "install_chromium: chromium $(dpkg-query -W -f='${Version}' chromium) installed"
