#!/usr/bin/env bash
# A Debian bookworm image with Python 3.11 for docker/Dockerfile, built without any registry:
#   scripts/base-image.sh [TAG]     (default localhost/debian-python:bookworm)
#   scripts/base-image.sh --mirror  print the Debian mirror apt uses here (for other builds)
# debootstrap fetches from the mirror apt already uses here (read from apt's sources, never
# written down in the repository); the result is kept in podman's image store, so a second run
# returns at once. Needs root, podman and debootstrap (scripts/services.sh containers).
set -euo pipefail
TAG="${1:-localhost/debian-python:bookworm}"

mirror() {
  # deb822 sources first (URIs: lines), then one-line sources; the first Debian archive wins.
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
          awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' |
          grep -v -- '-security' | head -n1 || true)
  fi
  [ -n "$uri" ] || { echo "base image: no Debian mirror in apt's sources" >&2; exit 1; }
  echo "$uri"
}

if [ "$TAG" = "--mirror" ]; then
  mirror; exit 0
fi
if podman image exists "$TAG"; then
  echo "base image: $TAG (cached)"; exit 0
fi

MIRROR=$(mirror)
ROOTFS=$(mktemp -d /tmp/deployflag-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "base image: debootstrap bookworm (about a minute)"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python-is-python3,ca-certificates \
  bookworm "$ROOTFS" "$MIRROR" >/dev/null
# Nothing of this machine's apt configuration or bootstrap log goes into the image.
rm -rf "$ROOTFS"/etc/apt/sources.list.d/* "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/debootstrap "$ROOTFS"/var/log/bootstrap.log
: > "$ROOTFS"/etc/apt/sources.list
tar -C "$ROOTFS" -c . | podman import --change 'CMD ["python3"]' - "$TAG" >/dev/null
echo "base image: $TAG built"
