#!/bin/bash
# SPDX-License-Identifier: MIT
# tests/vm/setup.sh: everything the ublk VM harness needs from apt, done
# idempotently (a second run with everything present touches no network).
#   - host tools: qemu-system-x86 (TCG), busybox-static (the guest shell),
#     cpio, and the guest payload tools (fio, e2fsprogs, qemu-utils, util-linux)
#   - the guest kernel: Debian bookworm-backports linux-image-6.12.*-amd64
#     (ships ublk_drv.ko.xz and nbd.ko.xz; bookworm's own 6.1 has no ublk),
#     fetched with `apt-get download` and unpacked with `dpkg -x` into the
#     cache directory; nothing is installed on the host.
# The backports suite is added with the machine's own mirror URI, read from
# /etc/apt/sources.list.d/debian.sources at run time: no host name is written
# into the repository.
#
# Cache: $QUBLK_VM_CACHE (default tests/vm/.cache).  Afterwards
# $CACHE/kernel is a symlink to the unpacked package tree and
# $CACHE/kernel/vmlinuz, $CACHE/kernel/modules point into it.
# Exit status: 0 ready, 1 failure (with the reason on stderr).
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${QUBLK_VM_CACHE:-$VM_DIR/.cache}
SRC_FILE=/etc/apt/sources.list.d/qublk-backports.sources
DEB_SOURCES=/etc/apt/sources.list.d/debian.sources

say() { echo "vm-setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    say "apt-get update"
    as_root apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
}

# --- host packages -------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically' \
    || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v fio >/dev/null || need+=(fio)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v blkdiscard >/dev/null || need+=(util-linux)
command -v xz >/dev/null || need+=(xz-utils)
command -v file >/dev/null || need+=(file)
command -v zstd >/dev/null || need+=(zstd)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
    apt_update
    say "apt-get install ${need[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need[@]}" >&2 \
        || die "apt-get install ${need[*]} failed"
fi
# busybox-static replaces /bin/busybox; check again now that `file` exists.
file -L /bin/busybox | grep -q 'statically' || {
    apt_update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends busybox-static >&2 || die "busybox-static"
}

# extract_vmlinux TREE: the uncompressed ELF kernel as TREE/vmlinux.  QEMU
# boots it through its PVH entry point, skipping the BIOS real-mode path and
# the in-guest zstd decompression, which cost seconds under TCG.  Optional:
# run.sh falls back to vmlinuz.
extract_vmlinux() {
    local tree=$1
    [ -s "$tree/vmlinux" ] && return 0
    command -v python3 >/dev/null && command -v zstd >/dev/null || return 0
    python3 - "$tree/vmlinuz" "$tree/vmlinux" <<'PY' || rm -f "$tree/vmlinux"
import subprocess, sys
img = open(sys.argv[1], 'rb').read()
for magic in (b'\x28\xb5\x2f\xfd',):  # Debian's amd64 kernels are zstd
    i = img.find(magic)
    if i < 0:
        continue
    # zstd complains about the bytes after the frame; the ELF is complete.
    out = subprocess.run(['zstd', '-dc'], input=img[i:], capture_output=True).stdout
    if out[:4] == b'\x7fELF':
        open(sys.argv[2] + '.tmp', 'wb').write(out)
        import os; os.rename(sys.argv[2] + '.tmp', sys.argv[2])
        sys.exit(0)
sys.exit(1)
PY
}

# --- guest kernel --------------------------------------------------------
if [ -e "$CACHE/kernel/vmlinuz" ] && [ -d "$CACHE/kernel/modules" ]; then
    extract_vmlinux "$CACHE/kernel/"
    say "kernel cached: $(readlink "$CACHE/kernel")"
    exit 0
fi

# The backports suite, pointed at the same mirror(s) as the main suite.
if [ ! -f "$SRC_FILE" ]; then
    [ -r "$DEB_SOURCES" ] || die "$DEB_SOURCES not found: cannot tell the apt mirror"
    # URIs of the stanza that carries the plain "bookworm" suite (not -security).
    uris=$(awk '
        /^[[:space:]]*$/ { if (s ~ /(^| )bookworm( |$)/ && u != "") print u; u = ""; s = ""; next }
        /^URIs:/   { sub(/^URIs:[[:space:]]*/, ""); u = $0 }
        /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); s = $0 }
        END { if (s ~ /(^| )bookworm( |$)/ && u != "") print u }' "$DEB_SOURCES" | head -n 1)
    [ -n "$uris" ] || die "no URIs for suite bookworm in $DEB_SOURCES"
    signed=$(awk '/^Signed-By:/ { print $2; exit }' "$DEB_SOURCES")
    say "adding bookworm-backports from $DEB_SOURCES's mirror"
    {
        echo "# Added by qublk tests/vm/setup.sh: guest kernel for the ublk VM tests."
        echo "Types: deb"
        echo "URIs: $uris"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [ -z "$signed" ] || echo "Signed-By: $signed"
    } | as_root tee "$SRC_FILE" >/dev/null
    apt_updated=0
fi

# Newest plain linux-image-6.12.N(+suffix)-amd64 that apt can actually fetch
# (not -dbg, -unsigned, -rt or -cloud).
pick_kernel() {
    local p
    for p in $(apt-cache pkgnames linux-image-6.12 2>/dev/null \
            | grep -E '^linux-image-6\.12\.[0-9]+(\+[a-z0-9]+)?-amd64$' | sort -rV); do
        if apt-cache show --no-all-versions "$p" 2>/dev/null | grep -q '^Filename:'; then
            echo "$p"
            return 0
        fi
    done
    return 1
}
pkg=$(pick_kernel || true)
if [ -z "$pkg" ]; then
    apt_update
    pkg=$(pick_kernel || true)
fi
[ -n "$pkg" ] || die "no linux-image-6.12.*-amd64 package in apt (is bookworm-backports reachable?)"
say "guest kernel package: $pkg"

mkdir -p "$CACHE"
dl=$(mktemp -d "$CACHE/dl.XXXXXX")
chmod 777 "$dl"   # apt downloads as _apt when it can write here
trap 'rm -rf "$dl"' EXIT
(cd "$dl" && apt-get download -q "$pkg" >&2) || {
    apt_update
    (cd "$dl" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
}
deb=$(ls "$dl"/*.deb)
tree=$CACHE/${pkg}
rm -rf "$tree.tmp"
dpkg -x "$deb" "$tree.tmp" || die "dpkg -x $deb failed"
kver=$(ls "$tree.tmp/lib/modules" | head -n 1)
[ -n "$kver" ] || die "$deb has no lib/modules"
[ -f "$tree.tmp/boot/vmlinuz-$kver" ] || die "$deb has no boot/vmlinuz-$kver"
ln -s "boot/vmlinuz-$kver" "$tree.tmp/vmlinuz"
ln -s "lib/modules/$kver" "$tree.tmp/modules"
extract_vmlinux "$tree.tmp"
rm -rf "$tree"
mv "$tree.tmp" "$tree"
ln -sfn "$pkg" "$CACHE/kernel"
say "kernel $kver unpacked into $tree"
