#!/usr/bin/env bash
# Install the Debian packages given as arguments when they are missing (as root, or through sudo).
# Without either, say what is missing and go on: the tests that need a package skip with a reason.
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then
    apt=(apt-get)
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    apt=(sudo apt-get)
else
    echo "warning: missing Debian packages: ${missing[*]} (install them with apt-get)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" install -y -q "${missing[@]}" >/dev/null || { "${apt[@]}" update -q >/dev/null && "${apt[@]}" install -y -q "${missing[@]}" >/dev/null; }
