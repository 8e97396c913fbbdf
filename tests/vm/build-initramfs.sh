#!/bin/bash
# SPDX-License-Identifier: MIT
# tests/vm/build-initramfs.sh: the guest's root file system, in three parts.
#
#   build-initramfs.sh base
#       Prints the path of the cached base archive, building it if these
#       scripts or the host tools changed.  It holds busybox (applets as
#       symlinks in /bin), bash, the guest tools with their shared libraries
#       and the dynamic loader (fio, mkfs.ext4/e2fsck, qemu-img/qemu-io,
#       blkdiscard, nbd-client, ...), /init and guest-lib.sh.  Kernel-independent.
#       Uncompressed: under TCG, unpacking ~100 MB is faster than gunzip.
#
#   build-initramfs.sh modules KERNEL
#       Prints the path of the cached module archive of guest kernel KERNEL
#       (6.12, 7.3: $CACHE/kernel-KERNEL), building it if needed: the kernel
#       modules the tests need (decompressed, in dependency order in
#       /lib/modules/load-order) and /etc/qublk-vm-kernel.
#
#   build-initramfs.sh overlay OUT.cpio [--qublk BIN] [--env NAME=VALUE]...
#                              SCRIPT [FILES...]
#       Writes a small per-run archive: the qublk binary (as
#       /usr/local/bin/qublk) and its libraries, SCRIPT and FILES in /vmtest/
#       (ELF files among them get their libraries too), and /vmtest/env.
#       The kernel unpacks concatenated newc archives in order, so the
#       modules and the overlay are simply appended to the base (later entries
#       win): rebuilding qublk never rebuilds the base.
#
# Cache: $QUBLK_VM_CACHE (default tests/vm/.cache), filled by setup.sh.
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${QUBLK_VM_CACHE:-$VM_DIR/.cache}
KTREE=

die() { echo "build-initramfs: error: $*" >&2; exit 1; }

# Tools copied into the base, by name; a missing one is left out with a
# warning (guest tests check for what they use).
TOOLS=(bash fio mkfs.ext4 mke2fs e2fsck fsck.ext4 tune2fs dumpe2fs debugfs resize2fs setpriv
       qemu-img qemu-io blkdiscard blockdev blkid losetup
       sha256sum cmp dd xxd strace nbd-client)
# Modules loaded at boot (with their dependencies, resolved from modinfo).
# crc32c is requested by name (crypto API) rather than as a dependency, and
# there is no modprobe in the guest, so it is listed explicitly; "?NAME" is
# optional (7.x has no crc32c_generic or libcrc32c: crc32c is built in).
MODULES=(ublk_drv nbd loop virtio_blk ?crc32c_generic ?libcrc32c ?crc32c_cryptoapi ext4)
# Modules shipped in /lib/modules but not loaded at boot: a guest script
# loads them with its own parameters (brd: the benchmark's ram disk).
SHIPPED=(brd)

# copy_elf ROOT SRC [DEST]: copy an executable or library into ROOT at DEST
# (default: the same path) and every shared library ldd finds for it, at the
# path ldd reports, plus the dynamic loader.  Symlinks are dereferenced.
# Forks are slow on this host (~25 ms each), so the libraries go in one cp.
copy_elf() {
    local root=$1 src=$2 dest=${3:-$2} lib
    local -a libs=()
    mkdir -p "$root${dest%/*}"
    cp -L "$src" "$root$dest"
    # "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" and
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; "not a dynamic executable"
    # (static binaries) yields nothing.
    for lib in $(ldd "$src" 2>/dev/null | awk '
            $2 == "=>" && $3 ~ /^\// { print $3; next }
            $1 ~ /^\// { print $1 }'); do
        [ -e "$root$lib" ] || libs+=("$lib")
    done
    [ ${#libs[@]} -eq 0 ] || cp -L --parents "${libs[@]}" "$root/"
}

is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }

# cpio_dir DIR OUT: a newc archive of DIR's contents, owned by root.
cpio_dir() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0) >"$2"
}

# Module name -> .ko.xz path (names compare with '-' and '_' equal).
declare -A MODPATH
index_modules() {
    local f n
    while IFS= read -r f; do
        n=${f##*/}
        n=${n%.ko.xz}
        MODPATH[${n//-/_}]=$f
    done < <(find "$KTREE/modules/kernel" -name '*.ko.xz')
}

mod_depends() {
    xz -dc "${MODPATH[$1]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '
}

# Depth-first: dependencies before the module itself.
declare -A MODDONE
MODORDER=()
add_module() {
    local m=${1//-/_} d
    [ -n "${MODDONE[$m]:-}" ] && return 0
    MODDONE[$m]=1
    [ -n "${MODPATH[$m]:-}" ] || die "module $m not in $KTREE/modules"
    for d in $(mod_depends "$m"); do
        add_module "$d"
    done
    MODORDER+=("$m")
}

build_base() {
    [ -x /bin/busybox ] || die "/bin/busybox missing: run tests/vm/setup.sh"
    # Key: these files, and the host tools' identities.
    local key t p
    key=$( {
        cat "$VM_DIR/build-initramfs.sh" "$VM_DIR/init" "$VM_DIR/guest-lib.sh"
        local -a paths=(/bin/busybox)
        for t in "${TOOLS[@]}"; do
            p=$(command -v "$t" 2>/dev/null) && paths+=("$p")
        done
        ls -lL "${paths[@]}"
    } | sha256sum | cut -c1-16)
    local out=$CACHE/base-$key.cpio
    if [ -s "$out" ]; then
        echo "$out"
        return 0
    fi
    echo "build-initramfs: building $out" >&2
    local root
    root=$(mktemp -d "${TMPDIR:-/tmp}/qublk-vm-root.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" EXIT
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,lib64,etc,proc,sys,dev,tmp,run,mnt,root,vmtest,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    # One fork for all applets; the links point at the host's path of
    # busybox (/usr/bin/busybox on merged-/usr), made to exist below.
    /bin/busybox --install -s "$root/bin"
    t=$(readlink "$root/bin/sh")
    [ "$t" = /bin/busybox ] || ln -sf /bin/busybox "$root$t"
    for t in "${TOOLS[@]}"; do
        p=$(command -v "$t" 2>/dev/null) || {
            echo "build-initramfs: warning: $t not found on the host, left out" >&2
            continue
        }
        copy_elf "$root" "$(readlink -f "$p")" "/usr/bin/$t"
    done
    ln -sf /usr/bin/bash "$root/bin/bash"
    # fsck.ext4 etc. look up their siblings through PATH only; nothing else.
    # The loader cache: libraries outside the default directories still load.
    find "$root" -name '*.so*' -type f -printf '%h\n' | sed "s|^$root||" \
        | sort -u >"$root/etc/ld.so.conf"
    /sbin/ldconfig -r "$root" 2>/dev/null || echo "build-initramfs: warning: ldconfig -r failed" >&2

    cp "$VM_DIR/init" "$root/init"
    chmod 755 "$root/init"
    cp "$VM_DIR/guest-lib.sh" "$root/vmtest/guest-lib.sh"
    # An ordinary user for the unprivileged-device tests (uid/gid 1000).
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'qtest:x:1000:1000:qublk test user:/tmp:/bin/sh' \
        >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' 'qtest:x:1000:' >"$root/etc/group"

    # A unique temporary name: two runs may build at once.
    local tmp
    tmp=$(mktemp "$CACHE/.base.XXXXXX")
    cpio_dir "$root" "$tmp"
    rm -f "$CACHE"/base-*.cpio
    mv "$tmp" "$out"
    rm -rf "$root"
    trap - EXIT
    echo "$out"
}

build_modules() {
    local kernel=$1
    KTREE=$CACHE/kernel-$kernel
    # The 6.12 kernel's link had no version before the harness knew two.
    [ -e "$KTREE/vmlinuz" ] || [ "$kernel" != 6.12 ] || KTREE=$CACHE/kernel
    [ -e "$KTREE/vmlinuz" ] || die "no kernel $kernel in $CACHE: run tests/vm/setup.sh"
    local name key
    name=$(readlink "$KTREE")
    key=$( { echo "$name"; printf '%s\n' "${MODULES[@]}" -- "${SHIPPED[@]}"; } | sha256sum | cut -c1-16)
    local out=$CACHE/modules-$kernel-$key.cpio
    if [ -s "$out" ]; then
        echo "$out"
        return 0
    fi
    echo "build-initramfs: building $out" >&2
    local root m
    root=$(mktemp -d "${TMPDIR:-/tmp}/qublk-vm-mod.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" EXIT
    mkdir -p "$root/lib/modules" "$root/etc"
    index_modules
    for m in "${MODULES[@]}"; do
        if [ "${m#\?}" != "$m" ]; then
            m=${m#\?}
            [ -n "${MODPATH[${m//-/_}]:-}" ] || continue
        fi
        add_module "$m"
    done
    for m in "${MODORDER[@]}"; do
        xz -dc "${MODPATH[$m]}" >"$root/lib/modules/$m.ko"
    done
    printf '%s\n' "${MODORDER[@]}" >"$root/lib/modules/load-order"
    for m in "${SHIPPED[@]}"; do
        [ -n "${MODPATH[$m]:-}" ] || continue
        [ -z "$(mod_depends "$m")" ] || die "shipped module $m has dependencies"
        xz -dc "${MODPATH[$m]}" >"$root/lib/modules/$m.ko"
    done
    echo "$name" >"$root/etc/qublk-vm-kernel"
    local tmp
    tmp=$(mktemp "$CACHE/.modules.XXXXXX")
    cpio_dir "$root" "$tmp"
    rm -f "$CACHE/modules-$kernel-"*.cpio
    mv "$tmp" "$out"
    rm -rf "$root"
    trap - EXIT
    echo "$out"
}

build_overlay() {
    local out=$1; shift
    local qublk='' script f
    local -a envs=()
    while [ $# -gt 0 ]; do
        case $1 in
            --qublk) qublk=$2; shift 2 ;;
            --env) envs+=("$2"); shift 2 ;;
            --) shift; break ;;
            -*) die "overlay: unknown option $1" ;;
            *) break ;;
        esac
    done
    [ $# -ge 1 ] || die "overlay: no guest script"
    script=$1; shift
    [ -f "$script" ] || die "guest script $script not found"
    local root
    root=$(mktemp -d "${TMPDIR:-/tmp}/qublk-vm-overlay.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" EXIT
    mkdir -p "$root/vmtest" "$root/usr/local/bin"
    if [ -n "$qublk" ]; then
        [ -x "$qublk" ] || die "qublk binary $qublk not found"
        copy_elf "$root" "$(readlink -f "$qublk")" /usr/local/bin/qublk
    fi
    cp "$script" "$root/vmtest/${script##*/}"
    for f in "$@"; do
        [ -e "$f" ] || die "file $f not found"
        if [ -f "$f" ] && is_elf "$f"; then
            copy_elf "$root" "$(readlink -f "$f")" "/vmtest/${f##*/}"
        else
            cp -rL "$f" "$root/vmtest/"
        fi
    done
    # Sourced by /init (busybox sh): NAME='value' lines, then exports.
    envs=("VMTEST_SCRIPT=/vmtest/${script##*/}" "${envs[@]}")
    [ -z "$qublk" ] || envs+=(QUBLK=/usr/local/bin/qublk)
    {
        for f in "${envs[@]}"; do
            [[ $f =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $f: expected NAME=VALUE"
            local v=${f#*=}
            printf "%s='%s'\n" "${f%%=*}" "${v//\'/\'\\\'\'}"
        done
        for f in "${envs[@]}"; do
            echo "export ${f%%=*}"
        done
    } >"$root/vmtest/env"
    cpio_dir "$root" "$out"
    rm -rf "$root"
    trap - EXIT
}

case ${1:-} in
    base) build_base ;;
    modules) [ $# -eq 2 ] || die "usage: modules KERNEL"; build_modules "$2" ;;
    overlay) shift; [ $# -ge 1 ] || die "overlay: no output file"; build_overlay "$@" ;;
    *) echo "usage: $0 base | modules KERNEL | overlay OUT.cpio [--qublk BIN] [--env N=V]... SCRIPT [FILES...]" >&2; exit 2 ;;
esac
