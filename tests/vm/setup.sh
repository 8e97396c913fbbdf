#!/bin/bash
# SPDX-License-Identifier: MIT
# tests/vm/setup.sh: everything the ublk VM harness needs from apt, done
# idempotently (a second run with everything present touches no network).
#   - host tools: qemu-system-x86 (TCG), busybox-static (the guest shell),
#     cpio, and the guest payload tools (fio, e2fsprogs, qemu-utils, util-linux)
#   - the guest kernels, fetched with `apt-get download` and unpacked with
#     `dpkg -x` into the cache directory; nothing is installed on the host:
#       6.12  Debian bookworm-backports linux-image-6.12.*-amd64 (ships
#             ublk_drv.ko.xz and nbd.ko.xz; bookworm's own 6.1 has no ublk)
#       7.3   Debian trixie-backports linux-binary-7.3.*-amd64 (vmlinuz; or
#             linux-binary-unsigned-7.3.*-amd64 when the signed one lags) and
#             linux-modules-7.3.*-amd64 (the image package is a meta package
#             there).  Fetched through a private apt state directory in the
#             cache, so the host's apt never sees trixie.
# Both suites use the machine's own mirror URI, read from
# /etc/apt/sources.list.d/debian.sources at run time: no host name is written
# into the repository.
#
# Usage: setup.sh [KERNEL...]   (default: 6.12 7.3, or $QUBLK_VM_KERNELS)
# Cache: $QUBLK_VM_CACHE (default tests/vm/.cache).  Afterwards
# $CACHE/kernel-V (V = 6.12, 7.3) is a symlink to the unpacked tree, with
# $CACHE/kernel-V/vmlinuz (and vmlinux) and $CACHE/kernel-V/modules in it;
# $CACHE/kernel is kernel-6.12 (older harness versions used that name).
# Exit status: 0 ready, 1 failure (with the reason on stderr).
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${QUBLK_VM_CACHE:-$VM_DIR/.cache}
SRC_FILE=/etc/apt/sources.list.d/qublk-backports.sources
# shellcheck source=tests/vm/apt-mirror.sh
. "$VM_DIR/apt-mirror.sh"   # mirror_uris, signed_by, DEB_SOURCES

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

# --- guest kernels -------------------------------------------------------

# unpack TREE DEB...: dpkg -x every DEB into TREE (atomically: TREE.tmp,
# then renamed), with TREE/vmlinuz, TREE/vmlinux and TREE/modules links.
unpack() {
    local tree=$1 deb kver vmlinuz; shift
    rm -rf "$tree.tmp"
    for deb in "$@"; do
        dpkg -x "$deb" "$tree.tmp" || die "dpkg -x $deb failed"
    done
    # bookworm: /lib/modules, /boot/vmlinuz-V; trixie: /usr/lib/modules/V/vmlinuz
    for d in lib usr/lib; do
        kver=$(ls "$tree.tmp/$d/modules" 2>/dev/null | head -n 1 || true)
        [ -n "$kver" ] && break
    done
    [ -n "$kver" ] || die "$* has no lib/modules"
    ln -s "$d/modules/$kver" "$tree.tmp/modules"
    if [ -f "$tree.tmp/boot/vmlinuz-$kver" ]; then
        vmlinuz=boot/vmlinuz-$kver
    elif [ -f "$tree.tmp/$d/modules/$kver/vmlinuz" ]; then
        vmlinuz=$d/modules/$kver/vmlinuz
    else
        die "$* has no vmlinuz for $kver"
    fi
    ln -s "$vmlinuz" "$tree.tmp/vmlinuz"
    [ -f "$tree.tmp/modules/kernel/drivers/block/ublk_drv.ko.xz" ] \
        || die "$* has no ublk_drv module"
    extract_vmlinux "$tree.tmp"
    rm -rf "$tree"
    mv "$tree.tmp" "$tree"
    say "kernel $kver unpacked into $tree"
}

# download DIR APT-OPTS... -- PKG...: apt-get download into DIR.
download() {
    local dir=$1; shift
    local -a opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    chmod 777 "$dir"   # apt downloads as _apt when it can write here
    (cd "$dir" && apt-get "${opts[@]}" download -q "$@" >&2)
}

# Newest plain NAME-V.N(+suffix)-amd64 that apt can actually fetch (not
# -dbg, -unsigned, -rt or -cloud).  pick PREFIX VERSION APT-OPTS...
pick() {
    local prefix=$1 ver=$2 p; shift 2
    local re="^${prefix}-${ver//./\\.}\\.[0-9]+(\\+[a-z0-9]+)?-amd64\$"
    for p in $(apt-cache "$@" pkgnames "$prefix-$ver" 2>/dev/null | grep -E "$re" | sort -rV); do
        # grep reads to the end: with -q it could exit first, and the
        # writer's SIGPIPE fails the pipeline under pipefail.
        if apt-cache "$@" show --no-all-versions "$p" 2>/dev/null | grep '^Filename:' >/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# 6.12: bookworm-backports, through the host's apt (as it always was).
kernel_6_12() {
    local tree
    tree=$(readlink "$CACHE/kernel-6.12" 2>/dev/null || readlink "$CACHE/kernel" 2>/dev/null || true)
    if [ -n "$tree" ] && [ -e "$CACHE/$tree/vmlinuz" ] && [ -d "$CACHE/$tree/modules" ]; then
        extract_vmlinux "$CACHE/$tree/"
        ln -sfn "$tree" "$CACHE/kernel-6.12"
        ln -sfn "$tree" "$CACHE/kernel"
        say "kernel 6.12 cached: $tree"
        return 0
    fi
    if [ ! -f "$SRC_FILE" ]; then
        local uris signed
        uris=$(mirror_uris) || die "cannot tell the apt mirror"
        signed=$(signed_by)
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
    local pkg
    pkg=$(pick linux-image 6.12 || true)
    if [ -z "$pkg" ]; then
        apt_update
        pkg=$(pick linux-image 6.12 || true)
    fi
    [ -n "$pkg" ] || die "no linux-image-6.12.*-amd64 package in apt (is bookworm-backports reachable?)"
    say "guest kernel package: $pkg"
    local dl
    dl=$(mktemp -d "$CACHE/dl.XXXXXX")
    DLS+=("$dl")
    download "$dl" -- "$pkg" || {
        apt_update
        download "$dl" -- "$pkg" || die "apt-get download $pkg failed"
    }
    unpack "$CACHE/$pkg" "$dl"/*.deb
    rm -rf "$dl"
    ln -sfn "$pkg" "$CACHE/kernel-6.12"
    ln -sfn "$pkg" "$CACHE/kernel"
}

# 7.3: trixie-backports, through a private apt state directory in the cache
# (its own sources list, lists and archives; the host's keyring).
kernel_7_3() {
    local tree
    tree=$(readlink "$CACHE/kernel-7.3" 2>/dev/null || true)
    if [ -n "$tree" ] && [ -e "$CACHE/$tree/vmlinuz" ] && [ -d "$CACHE/$tree/modules" ]; then
        extract_vmlinux "$CACHE/$tree/"
        say "kernel 7.3 cached: $tree"
        return 0
    fi
    local apt=$CACHE/apt-trixie-backports
    private_apt "$apt" "qublk tests/vm/setup.sh: the 7.3 guest kernel" trixie-backports ||
        die "cannot tell the apt mirror"
    local -a o=("${PRIVATE_APT[@]}")
    local bin try
    bin=$(pick linux-binary 7.3 "${o[@]}" || true)
    # A fresh machine once found neither package right after an update
    # that succeeded (a mirror in mid-sync?): update again before giving up.
    for try in 1 2 3; do
        [ -z "$bin" ] || break
        [ "$try" = 1 ] || sleep 15
        say "apt-get update (trixie-backports, private state in $apt; try $try of 3)"
        apt-get "${o[@]}" update -qq >&2 || die "apt-get update of trixie-backports failed"
        bin=$(pick linux-binary 7.3 "${o[@]}" || true)
        # The signed image package (linux-binary-V, from
        # linux-signed-amd64) can lag behind the unsigned one in the
        # archive; the VM boots either.
        [ -n "$bin" ] || bin=$(pick linux-binary-unsigned 7.3 "${o[@]}" || true)
    done
    if [ -z "$bin" ]; then
        say "linux-binary packages the index has:"
        apt-cache "${o[@]}" pkgnames linux-binary- >&2 || true
        die "no linux-binary-7.3.*-amd64 (or linux-binary-unsigned-7.3.*) package in trixie-backports"
    fi
    local v=${bin#linux-binary-}
    v=${v#unsigned-}
    local mods=linux-modules-$v name=linux-$v
    say "guest kernel packages: $bin $mods"
    local dl
    dl=$(mktemp -d "$CACHE/dl.XXXXXX")
    DLS+=("$dl")
    download "$dl" "${o[@]}" -- "$bin" "$mods" || die "apt-get download $bin $mods failed"
    unpack "$CACHE/$name" "$dl"/*.deb
    rm -rf "$dl"
    ln -sfn "$name" "$CACHE/kernel-7.3"
}

mkdir -p "$CACHE"
DLS=()
trap 'rm -rf "${DLS[@]}"' EXIT
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || read -r -a kernels <<<"${QUBLK_VM_KERNELS:-6.12 7.3}"
for k in "${kernels[@]}"; do
    case $k in
        6.12) kernel_6_12 ;;
        7.3) kernel_7_3 ;;
        *) die "unknown guest kernel '$k' (6.12 or 7.3)" ;;
    esac
done
