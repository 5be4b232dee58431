#!/usr/bin/env bash
# Install and start what the test suite and `make run` need on Debian 12:
#   Dovecot (dovecot-imapd), Prometheus + promtool, redis-server; podman + runc + debootstrap
#   (tests/test_image.py builds and runs the container image); PostgreSQL and Redis up on
#   127.0.0.1:5432 / :6379; the zod validator's node_modules.
# Idempotent and quiet: when everything is present it only probes and exits (~50 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf 'install-deps: %s\n' "$*" >&2; }

# `port_open PORT`: true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# `wait_port PORT NAME`: up to 30 s for a server we just started.
wait_port() {
    local i
    for i in $(seq 1 300); do
        port_open "$1" && return 0
        sleep 0.1
    done
    log "$2 did not come up on 127.0.0.1:$1"
    return 1
}

missing_packages() {
    local missing=()
    command -v dovecot >/dev/null && command -v doveadm >/dev/null || missing+=(dovecot-imapd)
    command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
    command -v redis-server >/dev/null || missing+=(redis-server)
    # The image test: podman with runc (crun cannot run on hybrid cgroups) and debootstrap for
    # its base image, since no container image registry is reachable.
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    echo "${missing[@]}"
}

install_packages() {
    local missing
    missing=$(missing_packages)
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing: $missing; run as root or: sudo apt-get install -y $missing"
        return 1
    fi
    log "installing $missing"
    # Keep the packages' init scripts from starting system-wide daemons (Dovecot on 143/993,
    # Prometheus on 9090): the tests run private instances. Only if no policy exists already.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local status=0
    {
        apt-get update -qq >/dev/null &&
            # shellcheck disable=SC2086  # word splitting of the package list is intended
            apt-get install -y -qq --no-install-recommends $missing >/dev/null
    } || status=$?
    [ "$own_policy" -eq 1 ] && rm -f "$policy"
    if [ "$status" -ne 0 ]; then
        log "apt-get failed ($status)"
        return "$status"
    fi
}

start_postgres() {
    port_open 5432 && return 0
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
        log "PostgreSQL is not reachable on 127.0.0.1:5432 and no cluster exists in /etc/postgresql"
        return 1
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_port 5432 PostgreSQL
}

start_redis() {
    port_open 6379 && return 0
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_port 6379 Redis
}

install_node_modules() {
    local dir
    for dir in tests/zod; do
        if [ -f "$dir/package.json" ] && [ ! -d "$dir/node_modules" ]; then
            log "npm ci in $dir"
            npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
        fi
    done
}

install_packages
start_postgres
start_redis
install_node_modules
# Partition tests (tests/harness/netns.py, tests/harness/sentinel.py): ip netns + nftables, Sentinel.
missing_packages() {
    command -v nft >/dev/null || echo nftables
    command -v redis-sentinel >/dev/null || echo redis-sentinel
}
install_packages
scripts/install-browser.sh
