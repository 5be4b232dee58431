#!/usr/bin/env bash
# docker/bookworm-base.sh [TAG]: make a Debian bookworm + Python 3.11 base image from Debian's
# own packages, for machines that reach Debian's archive but no container image registry.
# The Dockerfile builds on it unchanged: --build-arg PYTHON_IMAGE=TAG.
#
# - Cached: when TAG exists in podman's store, nothing is done (CI pays for it once per machine).
# - The mirror is the one apt uses on this machine (read from /etc/apt/sources.list*), so the
#   image is made from the same archive as the host's own packages.
# - The host's extra CA certificates (/usr/local/share/ca-certificates) go into the image's
#   trust store: where egress passes through a TLS-inspecting proxy, pip inside the build trusts
#   what the host trusts.
# Needs root, debootstrap and podman (scripts/install-deps.sh installs them).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # debootstrap, chroot
tag=${1:-localhost/shardworker-base:bookworm-python3.11}
suite=bookworm
podman_() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
log() { printf 'bookworm-base: %s\n' "$*" >&2; }

if podman_ image exists "$tag"; then
    log "$tag is cached"
    exit 0
fi

# The first archive URI apt uses for $suite, from one-line (.list) or deb822 (.sources) files.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v s="$suite" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
            if ($(i + 1) == s) { print $i; exit } }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 stanzas are separated by blank lines; print URIs of a stanza whose Suites has $suite.
        awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" } {
            uri = ""; ok = 0
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { split($i, u, /[ \t]+/); uri = u[2] }
                if ($i ~ /^Suites:/) { n = split($i, t, /[ \t]+/); for (j = 2; j <= n; j++) if (t[j] == s) ok = 1 }
            }
            if (ok && uri != "") { print uri; exit } }' "$f"
    done
}
mirror=$(apt_mirror | head -n 1)
if [ -z "$mirror" ]; then
    log "no apt source for $suite in /etc/apt/sources.list*: cannot choose a debootstrap mirror"
    exit 1
fi

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/bookworm-base.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap $suite (minbase + python3.11) from the host's apt mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 20 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    exit 1
}
rm -f "$rootfs.log"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
fi
# What Debian's own container images configure: apt keeps no package caches or downloaded
# .debs in a layer, and dpkg leaves out documentation and translations.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
DPKG
chroot "$rootfs" apt-get clean
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
tar -C "$rootfs" --numeric-owner -c . | podman_ import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$tag" >/dev/null
log "imported $tag"
# Bases of earlier recipes (same repository, other tag) are never used again.
podman_ images --format '{{.Repository}}:{{.Tag}}' --filter "reference=${tag%:*}" |
    while read -r old; do
        [ "$old" = "$tag" ] || podman_ rmi "$old" >/dev/null 2>&1 || true
    done
