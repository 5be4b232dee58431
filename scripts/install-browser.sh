#!/usr/bin/env bash
# Install what the console's browser test needs: Debian's headless Chromium (driven from
# pytest by the Python playwright package, which ships its own driver; no browser download).
# Idempotent: when chromium is present it exits at once.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf 'install-browser: %s\n' "$*" >&2; }

command -v chromium >/dev/null && exit 0
if [ "$(id -u)" -ne 0 ]; then
    log "chromium missing; run as root or: sudo apt-get install -y chromium fonts-dejavu-core"
    exit 1
fi
log "installing chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
