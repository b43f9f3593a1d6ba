#!/usr/bin/env bash
# Builds a local Python base image for the Dockerfile's BASE argument where no image registry can
# be reached: debootstrap a minimal Debian bookworm (Python 3.11, the version of the local torch
# wheel), make a virtual environment at /opt/venv whose `python` and `pip` come first on PATH
# (the same shape as python:3.11-slim: `pip install` works, `python` exists), then `docker import`.
#
#   deploy/base-image.sh [TAG]          TAG defaults to vqdiff-base:bookworm
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm).
# Needs root, debootstrap and a running Docker engine. Does nothing if TAG exists (FORCE=1 rebuilds).
set -euo pipefail

TAG=${1:-vqdiff-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

if [ "${FORCE:-0}" != 1 ] && $DOCKER image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }

ROOT=$(mktemp -d /tmp/vqdiff-base.XXXXXX)
cleanup() {
    # debootstrap mounts proc/sys inside the target; never rm -rf through a live mount
    local m
    for m in $(awk -v r="$ROOT" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m" || true; done
    if awk -v r="$ROOT" 'index($2, r) == 1 {found=1} END {exit !found}' /proc/mounts; then
        echo "left $ROOT in place: something is still mounted under it" >&2
    else
        rm -rf "$ROOT"
    fi
}
trap cleanup EXIT

# minbase: apt, dpkg, bash, coreutils, passwd (useradd); ca-certificates: Debian's public CAs only
nice -n 19 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOT" "$MIRROR"

chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv

# slim it: package lists, caches, docs, man pages, locales other than C
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
       "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
       "$ROOT"/usr/share/locale/* "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/tmp/*
find "$ROOT/usr/lib/python3" "$ROOT/usr/lib/python3.11" -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true

tar --numeric-owner -C "$ROOT" -c . | $DOCKER import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    --message "debootstrap $SUITE minbase + python3 venv at /opt/venv (deploy/base-image.sh)" \
    - "$TAG"
$DOCKER run --rm --network none "$TAG" python -c 'import sys, ensurepip; print("base ok", sys.version.split()[0])'
