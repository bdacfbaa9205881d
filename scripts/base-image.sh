#!/usr/bin/env bash
# Makes the image's base, debian:bookworm-slim, where no registry is reachable: a
# minimal Debian 12 root filesystem from the configured Debian mirror, imported into
# podman under the name the Dockerfile uses (so the Dockerfile builds unchanged here
# and anywhere a registry is reachable). Idempotent; about half a minute.
set -euo pipefail
if podman image exists debian:bookworm-slim; then
    exit 0
fi
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/\?$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
# The official image's sources: updates and security too (Debian's rustc-web is there).
rm -f "$rootfs/etc/apt/sources.list"
cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror}-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
tar -C "$rootfs" -c . | podman import - debian:bookworm-slim >/dev/null
echo "base image debian:bookworm-slim imported from $mirror" >&2
