#!/bin/bash
# SPDX-License-Identifier: MIT
# bench/setup-kublk.sh: build the second peer the ublk benchmark compares
# against, kublk, the ublk server of the kernel's selftests
# (tools/testing/selftests/ublk, GPL-2.0, Ming Lei et al.), from Debian's
# linux-source-7.3 (trixie-backports), into bench/.cache/kublk
# (git-ignored).  It is the reference server of the 7.3 driver: its null
# target with --auto_zc is what qublk's null target with auto_buf_reg zero
# copy compares against.  Linked statically (the guest is a busybox
# initramfs), against trixie's liburing: bookworm's 2.3 lacks
# io_uring_setup_buf_ring.  Idempotent: prints the path of the binary,
# building it only if it is missing; bench/.cache/kublk.version says what
# it was built from.  For benchmarks only: no kublk code goes into qublk,
# and no test needs it.
#
#   bench/setup-kublk.sh           # prints bench/.cache/kublk
#
# $QUBLK_KSRC_DEB names a linux-source-7.3_*.deb at hand; otherwise the
# newest one in bench/.cache/debs, else it is fetched (160 MB) with
# `apt-get download` through a private apt state in bench/.cache/apt-trixie
# (trixie and trixie-backports from the mirror of
# /etc/apt/sources.list.d/debian.sources, as tests/vm/setup.sh does; the
# host's apt never sees trixie).  liburing-dev comes the same way unless the
# host's is 2.9 (trixie's) or newer.  Only the kernel's UAPI headers
# (include/uapi/linux) and the selftest directory are unpacked from the
# source tarball.  Exit 77 when a tool, the mirror or a package is missing.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$TOP/bench/.cache
OUT=$CACHE/kublk
DEBS=$CACHE/debs
BUILD=$CACHE/kublk-build
# shellcheck source=tests/vm/apt-mirror.sh
. "$TOP/tests/vm/apt-mirror.sh"   # mirror_uris, signed_by, DEB_SOURCES
KV=7.3

if [ -x "$OUT" ]; then
    echo "$OUT"
    exit 0
fi
say() { echo "setup-kublk.sh: $*" >&2; }
skip() { say "$*"; exit 77; }
die() { say "$*"; exit 1; }

missing=()
for t in gcc dpkg-deb tar xz; do
    command -v "$t" >/dev/null || missing+=("$t")
done
[ ${#missing[@]} -eq 0 ] || skip "missing ${missing[*]}: apt-get install gcc dpkg xz-utils tar"
mkdir -p "$DEBS"

# ---- the private apt state (trixie + trixie-backports) -------------------

APT=()
apt_state() {
    [ ${#APT[@]} -eq 0 ] || return 0
    command -v apt-get >/dev/null || skip "apt-get missing"
    private_apt "$CACHE/apt-trixie" "qublk bench/setup-kublk.sh: kublk's sources and liburing" \
        trixie trixie-backports || skip "cannot tell the apt mirror"
    APT=("${PRIVATE_APT[@]}")
}

# fetch PKG: the newest bench/.cache/debs/PKG_*.deb, downloaded first when
# there is none.
fetch() {
    local pkg=$1 deb
    deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*_*.deb" | sort -V | tail -n 1)
    if [ -z "$deb" ]; then
        apt_state
        if ! apt-cache "${APT[@]}" show --no-all-versions "$pkg" 2>/dev/null | grep '^Filename:' >/dev/null; then
            say "apt-get update (trixie, trixie-backports; private state in $CACHE/apt-trixie)"
            apt-get "${APT[@]}" update -qq >&2 || skip "apt-get update of trixie failed"
        fi
        say "apt-get download $pkg"
        chmod 777 "$DEBS"   # apt downloads as _apt when it can write here
        (cd "$DEBS" && apt-get "${APT[@]}" download -q "$pkg" >&2) || skip "apt-get download $pkg failed"
        deb=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*_*.deb" | sort -V | tail -n 1)
        [ -n "$deb" ] || skip "apt-get download $pkg left no .deb in $DEBS"
    fi
    echo "$deb"
}

# ---- sources -------------------------------------------------------------

ksrc=${QUBLK_KSRC_DEB:-}
if [ -n "$ksrc" ]; then
    [ -f "$ksrc" ] || skip "QUBLK_KSRC_DEB=$ksrc not found"
else
    ksrc=$(fetch "linux-source-$KV")
fi
rm -rf "$BUILD"
mkdir -p "$BUILD"
log=$CACHE/kublk.build.log
: >"$log"
say "unpacking the selftest and the UAPI headers from $(basename "$ksrc")"
K=linux-source-$KV
dpkg-deb --fsys-tarfile "$ksrc" | tar -xOf - "./usr/src/$K.tar.xz" \
    | tar -xJf - -C "$BUILD" "$K/tools/testing/selftests/ublk" "$K/include/uapi/linux" \
    || die "unpacking $ksrc failed"
SRC=$BUILD/$K/tools/testing/selftests/ublk
[ -f "$SRC/kublk.c" ] || die "$ksrc has no tools/testing/selftests/ublk/kublk.c"

# The UAPI headers as `make headers_install` would leave them (its sed,
# without unifdef: -D__EXPORTED_HEADERS__ instead), ahead of the host's
# 6.1 ones; asm/ stays the host's.
mkdir -p "$BUILD/usr/include"
cp -r "$BUILD/$K/include/uapi/linux" "$BUILD/usr/include/"
find "$BUILD/usr/include" -name '*.h' -exec sed -E -i -e '
    s/([[:space:](])(__user|__force|__iomem)[[:space:]]/\1/g
    s/__attribute_const__([[:space:]]|$)/\1/g
    s@^#include <linux/compiler.h>@@
    s/(^|[^a-zA-Z0-9])__packed([^a-zA-Z0-9_]|$)/\1__attribute__((packed))\2/g
    s@#(ifndef|define|endif[[:space:]]*/[*])[[:space:]]*_UAPI@#\1 @
    s/__ASSEMBLY__/__ASSEMBLER__/g' {} +

# liburing: the host's if it is new enough (and has its static library).
uring_cflags=() uring_lib=-luring uring_ver=
if pkg-config --atleast-version=2.9 liburing 2>/dev/null \
    && [ -f "$(pkg-config --variable=libdir liburing)/liburing.a" ]; then
    uring_ver="host liburing $(pkg-config --modversion liburing)"
else
    udeb=$(fetch liburing-dev)
    dpkg-deb -x "$udeb" "$BUILD/liburing" || die "dpkg-deb -x $udeb failed"
    uring_lib=$(find "$BUILD/liburing" -name liburing.a | head -n 1)
    [ -n "$uring_lib" ] || die "$udeb has no liburing.a"
    uring_cflags=(-I "$BUILD/liburing/usr/include")
    uring_ver="liburing-dev $(dpkg-deb -f "$udeb" Version)"
fi

# ---- build ---------------------------------------------------------------

# As its Makefile: every .c but the standalone metadata_size.c, -O3, with
# lib.mk's -D_GNU_SOURCE.
srcs=()
for f in "$SRC"/*.c; do
    [ "$(basename "$f")" = metadata_size.c ] || srcs+=("$f")
done
say "building kublk (log: $log)"
if ! gcc -O3 -Wall -D_GNU_SOURCE -D__EXPORTED_HEADERS__ -isystem "$BUILD/usr/include" \
        "${uring_cflags[@]}" -o "$BUILD/kublk" "${srcs[@]}" \
        -static "$uring_lib" -lpthread -lm >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "building kublk failed (log: $log)"
fi
echo "kublk from linux-source-$KV $(dpkg-deb -f "$ksrc" Version), $uring_ver, static" >"$OUT.version"
cp "$BUILD/kublk" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
rm -rf "$BUILD"
echo "$OUT"
