#!/bin/bash
# SPDX-License-Identifier: MIT
# Error injection on every write path of the qcow2 driver (issue 7), as
# QEMU's iotests 026 do with blkdebug: `qublk nbd` runs with QUBLK_INJECT
# failing one call of one path (site) with EIO or ENOSPC, and a workload
# that goes through that path.  For every site and errno:
#   - a request fails with that errno (qemu-io reports it);
#   - the server keeps serving: data written before reads back, and a
#     later write succeeds, and so does its flush, except after an EIO
#     that leaves the disk's state unknown (a pointer switch: L1 entry,
#     refcount-table entry, header; or a sync): then every flush fails
#     until the image is reopened (sticky, as QEMU does after a failed
#     fdatasync);
#   - after the server exits, `qemu-img check` finds no corruption (leaks
#     allowed) and the data written before the fault is intact;
#   - the image reopens read-write and a write + flush succeed.
# Sites: write_aio (in place), cow_write / cow_read (allocating writes over
# a backing file, a compressed image, a snapshot), l2_update,
# l2_alloc_write, l1_update, refblock_update, refblock_alloc,
# reftable_update, reftable_grow(_blocks), header_update, flush.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io
[ "$QUBLK_TEST_SERVER" = qublk ] || skip "qublk-specific (QUBLK_INJECT)"
requires_server

PATTERN=${1:-}

# make_image KIND IMG: the image a workload starts from, with 0x11 in its
# first 256 KiB (the "before" data).
make_image() {
    local kind=$1 img=$2 d
    d=$(dirname "$img")
    case $kind in
        plain)
            mkimg -f qcow2 "$img" 1G
            qemu-io -f qcow2 -c 'write -P 0x11 0 256k' "$img" >/dev/null ;;
        small)
            # 512 B clusters: refcount blocks every 128 KiB of file, the
            # refcount table's coverage ends at 8 MiB.
            mkimg -f qcow2 -o cluster_size=512 "$img" 16M
            qemu-io -f qcow2 -c 'write -P 0x11 0 256k' "$img" >/dev/null ;;
        backing)
            mkimg -f qcow2 "$d/base.qcow2" 64M
            qemu-io -f qcow2 -c 'write -P 0x11 0 4M' "$d/base.qcow2" >/dev/null
            mkimg -f qcow2 -b base.qcow2 -F qcow2 "$img" ;;
        compressed)
            mkimg -f qcow2 "$d/src.qcow2" 64M
            qemu-io -f qcow2 -c 'write -P 0x11 0 4M' "$d/src.qcow2" >/dev/null
            qemu-img convert -c -O qcow2 "$d/src.qcow2" "$img" || fail "convert -c"
            rm -f "$d/src.qcow2" ;;
        snapshot)
            mkimg -f qcow2 "$img" 64M
            qemu-io -f qcow2 -c 'write -P 0x11 0 4M' "$img" >/dev/null
            qemu-img snapshot -c s1 "$img" || fail "snapshot" ;;
    esac
}

# workload KIND: qemu-io commands that go through the site under test.
workload() {
    case $1 in
        plain) echo 'write -P 0x22 192k 64k'       # in place
               echo 'write -P 0x33 8M 192k'        # allocating, new L2
               echo 'write -P 0x44 600M 4k' ;;     # another L2 table
        small) echo 'write -P 0x33 1M 4M'          # new refcount blocks
               echo 'write -P 0x44 7M 5M' ;;       # crosses the coverage
        backing|compressed|snapshot)
               echo 'write -P 0x33 100k 8k'        # COW inside a cluster
               echo 'write -P 0x44 2M 100k' ;;
    esac
}

run_case() {
    local site=$1 err=$2 kind=$3
    local name=$site-$err-$kind img out rc msg dir
    [ -z "$PATTERN" ] || [[ $name =~ $PATTERN ]] || return 0
    dir=$TMPD/$name
    mkdir -p "$dir"
    img=$dir/img.qcow2
    out=$dir/qemu-io.out
    FAIL_CONTEXT="case $name; replay: $0 '^$name\$'"
    make_image "$kind" "$img"
    case $err in EIO) msg='Input/output error' ;; ENOSPC) msg='No space left on device' ;; esac

    QUBLK_INJECT="$site:$err" start_nbd_server "$img"
    grep -q "error injection armed: $site:$err" "$NBD_LOG" || fail "injection not armed"
    # Writeback: writes are not followed by a flush each (no FUA).  A
    # failed flush prints nothing: its exit status tells.
    rc=0
    { workload "$kind"; echo 'read -P 0x11 0 64k'; echo flush; } |
        qemu-io -f raw -t writeback "$NBD_URI" >"$out" 2>&1 || rc=$?
    grep -q "injected $msg at $site" "$NBD_LOG" ||
        { cat "$out" "$NBD_LOG" >&2; fail "the workload never reached $site"; }
    # qemu-io's status says whether a command failed (flush prints none).
    [ "$rc" != 0 ] || { cat "$out" "$NBD_LOG" >&2; fail "no request failed"; }
    ! grep -q 'failed: ' "$out" || grep -q "failed: $msg" "$out" ||
        { cat "$out" >&2; fail "a request failed with another error than $msg"; }
    grep -q 'read 65536/65536 bytes at offset 0' "$out" ||
        { cat "$out" >&2; fail "reads stopped after the fault"; }
    # After EIO where the disk's state is unknown (a pointer switch or a
    # sync), no flush may succeed until reopen; elsewhere the next flush
    # writes the structure again.
    local sticky=0
    case $site in l1_update|reftable_update|header_update) [ "$err" != EIO ] || sticky=1 ;; esac
    # A failed sync may have lost written pages, whatever the errno.
    [ "$site" != flush ] || sticky=1
    # Still serving: a new write succeeds (after a sticky error, one into
    # a cluster of ours: allocations need syncs).
    local later=32M again=40M
    [ "$kind" != small ] || { later=12M; again=14M; }
    if [ "$sticky" = 1 ]; then
        later=192k
        case $kind in backing|compressed|snapshot) later=100k ;; esac
    fi
    qemu-io -f raw -t writeback -c "write -P 0x55 $later 4k" "$NBD_URI" >"$out" 2>&1 ||
        { cat "$out" >&2; fail "a write after the fault failed"; }
    rc=0
    qemu-io -f raw -t writeback -c flush "$NBD_URI" >"$out" 2>&1 || rc=$?
    if [ "$sticky" = 1 ] && [ "$rc" = 0 ]; then
        fail "flush succeeded after a lost pointer switch or sync (must be sticky)"
    fi
    if [ "$sticky" = 0 ] && [ "$rc" != 0 ]; then
        cat "$out" >&2; fail "flush after a cleared fault failed"
    fi
    # The server exits 0, or 1 when its last flush failed (EIO: sticky).
    rc=0
    kill -TERM "$NBD_PID"
    wait "$NBD_PID" || rc=$?
    NBD_PID=
    ! _has_crash_report "$NBD_LOG" || { cat "$NBD_LOG" >&2; fail "sanitizer report"; }
    [ "$rc" = 0 ] || { [ "$rc" = 1 ] && [ "$sticky" = 1 ]; } ||
        { tail -n 20 "$NBD_LOG" >&2; fail "server exit status $rc"; }
    rc=0
    qemu-img check "$img" >"$out" 2>&1 || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 3 ] || { cat "$out" >&2; fail "qemu-img check exit $rc"; }
    qemu-io -f qcow2 -r -c 'read -P 0x11 0 64k' "$img" | grep -q '^read 65536' ||
        fail "data written before the fault is damaged"
    # Reopened without injection: fully usable again.
    start_nbd_server "$img"
    printf 'write -P 0x66 %s 64k\nflush\nread -P 0x66 %s 64k\n' "$again" "$again" |
        qio "$NBD_URI" raw
    stop_nbd_server
    rc=0
    qemu-img check "$img" >"$out" 2>&1 || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 3 ] || { cat "$out" >&2; fail "qemu-img check exit $rc after reuse"; }
    rm -rf "$dir"
    echo "ok $name"
    FAIL_CONTEXT=
}

n=0
for err in EIO ENOSPC; do
    for site in write_aio cow_write l2_update l2_alloc_write l1_update refblock_update flush; do
        run_case "$site" "$err" plain; n=$((n + 1))
    done
    for site in refblock_alloc reftable_update reftable_grow reftable_grow_blocks header_update; do
        run_case "$site" "$err" small; n=$((n + 1))
    done
    for kind in backing compressed snapshot; do
        for site in cow_read cow_write l2_update; do
            run_case "$site" "$err" "$kind"; n=$((n + 1))
        done
    done
    run_case l2_alloc_write "$err" snapshot; n=$((n + 1))
done
echo "$n cases run"
