#!/bin/bash
# SPDX-License-Identifier: MIT
# bench/setup-peer.sh: build the peer the ublk benchmark compares against,
# ublksrv (MIT, Ming Lei) at 229e918, the last commit with its qcow2 target,
# from the tarball in the shared peers directory, into bench/.cache/
# (git-ignored).  Idempotent: prints the path of the binary, building it
# only if it is missing.  For benchmarks only: no ublksrv code goes into
# qublk, and no test needs it (so .ci/setup does not install its build
# dependencies).
#
#   bench/setup-peer.sh            # prints bench/.cache/ublksrv
#
# $QUBLK_PEER_TARBALL overrides the tarball (default
# ../shared/peers/ublksrv-229e918.tar.gz next to the worktree).  Build
# dependencies (Debian): g++ autoconf automake libtool pkg-config
# liburing-dev.  Exit 77 when the tarball or a build tool is missing.
#
# Only the `ublk` program is built: with --disable-shared the tree's
# demo_null/demo_event (C programs linked by the C compiler against the
# static C++ library) fail to link, which `make` alone would stop on.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$TOP/bench/.cache
NAME=ublksrv-229e918
TARBALL=${QUBLK_PEER_TARBALL:-$TOP/../shared/peers/$NAME.tar.gz}
OUT=$CACHE/ublksrv

if [ -x "$OUT" ]; then
    echo "$OUT"
    exit 0
fi
[ -f "$TARBALL" ] || { echo "setup-peer.sh: $TARBALL not found (set QUBLK_PEER_TARBALL)" >&2; exit 77; }
missing=()
for t in g++ autoreconf libtoolize pkg-config make; do
    command -v "$t" >/dev/null || missing+=("$t")
done
pkg-config --exists liburing 2>/dev/null || missing+=(liburing)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-peer.sh: missing ${missing[*]}: apt-get install g++ autoconf automake libtool pkg-config liburing-dev" >&2
    exit 77
fi

mkdir -p "$CACHE"
rm -rf "${CACHE:?}/$NAME"
tar -xzf "$TARBALL" -C "$CACHE"
log=$CACHE/$NAME.build.log
echo "setup-peer.sh: building $NAME (log: $log)" >&2
if ! (cd "$CACHE/$NAME" && autoreconf -i && ./configure --disable-shared && make -j2 -C lib && make -j2 ublk) >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "setup-peer.sh: building $NAME failed (log: $log)" >&2
    exit 1
fi
# Named ublksrv (not ublk) so that it is told apart in the guest (pidof,
# /proc comm).
cp "$CACHE/$NAME/ublk" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$OUT"
