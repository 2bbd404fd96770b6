#!/usr/bin/env bash
# apt_install.sh <tag> <package>...: install Debian packages (as root), rerun-safe: packages already
# installed are not touched. Waits up to 5 minutes for another apt/dpkg to finish (a shared machine),
# and runs `apt-get update` only when the package lists are missing or stale for what is asked.
# Quiet; the full output goes to /tmp/<tag>_apt.log.
set -euo pipefail
tag=$1; shift
[ "$(id -u)" = 0 ] || { echo "$tag: error: run as root (it installs Debian packages)" >&2; exit 1; }
[ -r /etc/debian_version ] || { echo "$tag: error: written for Debian 12 (apt)" >&2; exit 1; }
missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} = 0 ] && { echo "$tag: $* already installed"; exit 0; }
echo "$tag: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
log=/tmp/${tag}_apt.log
"${apt[@]}" install "${missing[@]}" > "$log" 2>&1 || {
    apt-get -o DPkg::Lock::Timeout=300 update -q >> "$log" 2>&1 && "${apt[@]}" install "${missing[@]}" >> "$log" 2>&1; } \
    || { echo "$tag: error: apt-get install ${missing[*]} failed: $log" >&2; exit 1; }
