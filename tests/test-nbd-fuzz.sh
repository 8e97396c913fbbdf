#!/bin/bash
# SPDX-License-Identifier: MIT
# The NBD server under a random client (tests/nbd_fuzz.py): four clients
# at a time open sessions of junk bytes, random options (shaped like the
# real ones, their inner and outer lengths right or wrong) and random
# requests (every command and unknown ones, offsets and lengths at and
# past the export's end and the protocol's limits, payloads cut short),
# in compact, structured and extended modes.  What must hold afterwards,
# each checked against QEMU's tools:
#   - every session we ended was ended by the server too (none stuck);
#   - the server still serves a good client: qemu-io writes a pattern
#     and reads it back, and qemu-img compare finds the export equal to
#     the image as qemu-img reads it after the server is gone;
#   - SIGTERM exits 0 with no sanitizer report in its log;
#   - qemu-img check finds the image clean (writable runs: the random
#     writes, trims and zeroes land where they may), the backing file
#     unchanged; a read-only export leaves the image's bytes as they were.
# Cases: qcow2 over a qcow2 backing file with data (cache writeback),
# qcow2 with 4 KiB clusters (cache none), the same read-only, raw.
# Replay: QUBLK_SEED=N tests/test-nbd-fuzz.sh [CASE-PATTERN]
# (QUBLK_FUZZ_SESSIONS=N for more sessions, as on a long run by hand).
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
requires_server

SEED=${QUBLK_SEED:-$(( ($(date +%s) * 1000 + RANDOM) % 1000000000 ))}
case $QUBLK in *asan*) SESSIONS=${QUBLK_FUZZ_SESSIONS:-1500} ;; *) SESSIONS=${QUBLK_FUZZ_SESSIONS:-2000} ;; esac
PATTERN=${1:-}
SIZE=$((64 * 1024 * 1024))
echo "seed $SEED, $SESSIONS sessions a case (replay: QUBLK_SEED=$SEED $0 ${PATTERN})"

# name  format  cluster_size  backing  mode  cache
CASES=(
    "qcow2-backing  qcow2  64k  yes  rw  writeback"
    "qcow2-c4k      qcow2  4k   no   rw  none"
    "qcow2-ro       qcow2  64k  no   ro  writeback"
    "raw            raw    -    no   rw  writeback"
)

run_case() {
    local idx=$1 name=$2 fmt=$3 cs=$4 backing=$5 mode=$6 cache=$7
    local dir=$TMPD/$name img seed=$((SEED + idx))
    mkdir -p "$dir"
    img=$dir/img.$fmt
    FAIL_CONTEXT="case $name seed $SEED; replay: QUBLK_SEED=$SEED $0 '^$name\$'"
    if [ "$fmt" = raw ]; then
        mkimg -f raw "$img" "$SIZE"
    elif [ "$backing" = yes ]; then
        mkimg -f qcow2 "$dir/base.qcow2" "$SIZE"
        qio "$dir/base.qcow2" qcow2 <<<"write -P 0x11 0 16M
write -P 0x22 40M 8M"
        cp "$dir/base.qcow2" "$dir/base.orig"
        mkimg -f qcow2 -o "cluster_size=$cs" -b "$dir/base.qcow2" -F qcow2 "$img"
    else
        mkimg -f qcow2 -o "cluster_size=$cs" "$img" "$SIZE"
    fi
    qio "$img" "$fmt" <<<"write -P 0x5a 4M 8M
write -z 6M 1M
write -P 0x6b 60M 4M"
    cp "$img" "$dir/img.orig"

    local -a ro=()
    [ "$mode" = rw ] || ro=(--read-only)
    start_nbd_server "$img" --format "$fmt" --cache "$cache" "${ro[@]}"
    "$PYTHON" "$TESTS_DIR/nbd_fuzz.py" "$NBD_SOCK" "$SIZE" "$seed" "$SESSIONS" 4 \
        >"$dir/fuzz.out" 2>&1 || { cat "$dir/fuzz.out" >&2; fail "the fuzz client failed"; }
    sed 's/^/  /' "$dir/fuzz.out"
    # Not vacuous: sessions reached transmission and ended cleanly.
    grep -Eq '^ *[1-9][0-9]* transmit: ok$' "$dir/fuzz.out" \
        || fail "no session reached transmission and ended by itself"
    _alive "$NBD_PID" || fail "the server is gone after the fuzz sessions"

    # A good client after all that.
    if [ "$mode" = rw ]; then
        qio "$NBD_URI" raw <<<"write -P 0xc3 1M 192k
read -P 0xc3 1M 192k
aio_write -P 0xd4 20M 64k
aio_write -P 0xd5 21M 64k
aio_flush
read -P 0xd4 20M 64k
read -P 0xd5 21M 64k"
    else
        qio "$NBD_URI" raw -r <<<"read -P 0x5a 4M 2M
read -P 0 6M 1M
read -P 0x6b 60M 4M"
    fi
    nbd_read_all "$dir/export.raw"
    stop_nbd_server
    qcompare "$dir/export.raw" "$img"
    qcheck "$img"
    if [ "$mode" = ro ]; then
        cmp "$img" "$dir/img.orig" >&2 || fail "a read-only export changed the image"
    fi
    if [ "$backing" = yes ]; then
        cmp "$dir/base.qcow2" "$dir/base.orig" >&2 || fail "the backing file changed"
    fi
    rm -rf "$dir"
    FAIL_CONTEXT=
}

run_table run_case "$PATTERN" "${CASES[@]}"
