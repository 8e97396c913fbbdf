# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# bench/vm-lib.guest.sh: what the bench VM's guest scripts share, sourced
# by bench/vm-ublk.guest.sh and bench/vm-profile.guest.sh (the host passes
# this file, and the peers' binaries, /vmtest/ublksrv and /vmtest/kublk,
# as run.sh file arguments): the file system the images live in
# (bench_mount), making and removing images (mk_image, drop), and the peer
# servers (start_ublksrv, start_kublk and their stops).  Uses $B (the
# images' directory), $FS (tmpfs or ext4), $SIZE (the images' size) and
# $QDEPTH (the queue depth).

# ---- the file system ----------------------------------------------------

# bench_mount: mount $B.  tmpfs, or ext4 on a brd ram disk (BENCH_FS).
# tmpfs takes no I/O without blocking (no FMODE_NOWAIT), so io_uring
# hands every read and write to an io-wq worker thread, and serializes the
# writes to one file (no FOP_DIO_PARALLEL_WRITE); on ext4 over brd an
# O_DIRECT read or overwrite of written blocks is issued inline, as on a
# disk, and only allocating writes go to io-wq.
bench_mount() {
    mkdir -p "$B"
    # (busybox here has no mountpoint applet)
    grep -q " $B " /proc/mounts && return 0
    case $FS in
        tmpfs) mount -t tmpfs -o size=90% tmpfs "$B" ;;
        ext4)
            # rd_size in KiB: 90% of the guest's memory, allocated as
            # written and returned on discard (drop's fstrim).  The first
            # fstrim visits every group once; later ones only what was
            # freed since.
            insmod /lib/modules/brd.ko rd_nr=1 \
                rd_size=$(( $(awk '/MemTotal/ { print $2 }' /proc/meminfo) * 9 / 10 ))
            mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0,nodiscard /dev/ram0
            mount -t ext4 /dev/ram0 "$B"
            fstrim "$B" ;;
        *) echo "BENCH_FS=$FS: tmpfs or ext4" >&2; exit 2 ;;
    esac
}

# ---- images ---------------------------------------------------------------

# drop FILE: remove it; on ext4 also give its blocks back to brd now, and
# wait for that: sync (the journal commit releases the blocks), then
# fstrim (discards them, synchronously).  Mounted -o discard instead, ext4
# discards from a kworker some time after the commit: a file of 40k
# random 4k extents kept it busy through the next run, whose writes to
# brd then spun on its page-tree lock (0.17-0.26x on empty qcow2 images).
drop() {
    [ -e "$1" ] || return 0
    rm -f "$1"
    [ "$FS" = tmpfs ] && return 0
    sync
    fstrim "$B"
}

# mk_image KIND PATH: raw (preallocated), sparse (raw, created empty),
# prealloc (qcow2, preallocated), empty (qcow2).  Preallocated images:
# falloc on tmpfs (pages allocated, never written), or full with
# $BENCH_PREALLOC=full (every page written); full on ext4, whose fallocated
# extents are unwritten: their first write converts them (so it is issued
# through io-wq), which would make them empty images.  qemu-img writes
# those zeros through the page cache, and an O_DIRECT write over cached
# pages must drop them, which io_uring cannot do without blocking (it
# would go to io-wq): they start uncached.
mk_image() { # KIND PATH; $BENCH_PREALLOC: falloc (default) or full on tmpfs
    local pre=${BENCH_PREALLOC:-falloc}
    [ "$FS" = tmpfs ] || pre=full
    drop "$2"
    case $1 in
        raw) qemu-img create -q -f raw -o preallocation=$pre "$2" "$SIZE" ;;
        prealloc) qemu-img create -q -f qcow2 -o preallocation=$pre "$2" "$SIZE" ;;
        empty) qemu-img create -q -f qcow2 "$2" "$SIZE" ;;
        sparse) qemu-img create -q -f raw "$2" "$SIZE" ;;
    esac || return
    if [ "$FS" != tmpfs ] && { [ "$1" = raw ] || [ "$1" = prealloc ]; }; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

# ---- the peers --------------------------------------------------------------

# ublksrv: `ublk add` returns once its daemon has started the device; a
# fixed device number, so that it never meets qublk's.  Same queue depth
# and one queue (its qcow2 target has only one); O_DIRECT is its default
# for loop and qcow2.  Its null target is 250 GiB (not settable), qublk's
# the image size: no matter for a null device.
UBLKSRV_ID=9
have_ublksrv() { command -v ublksrv >/dev/null; }
start_ublksrv() { # TYPE [FILE]
    mkdir -p /tmp/ublksrvd
    peer_start ublksrv "$UBLKSRV_ID" -t "$1" -n "$UBLKSRV_ID" -q 1 -d "$QDEPTH" ${2:+-f "$2"}
}
stop_ublksrv() { peer_stop ublksrv "$UBLKSRV_ID"; }

# kublk (tools/testing/selftests/ublk): `kublk add` forks its daemon and
# returns once the device is started; a fixed device number, as for
# ublksrv.  One queue (so one I/O thread), the same depth; its loop target
# opens the file O_DIRECT.  --auto_zc: the request's pages are registered
# as the io_uring buffer by the driver (UBLK_F_AUTO_BUF_REG), the zero
# copy qublk uses on 7.3; the null target then issues a NOP on that buffer
# per request, the loop target reads or writes the file with it.  Its null
# target is 250 GiB, like ublksrv's.
KUBLK_ID=10
have_kublk() { command -v kublk >/dev/null; }
start_kublk() { # TYPE [--auto_zc] [FILE]
    peer_start kublk "$KUBLK_ID" -t "$1" -n "$KUBLK_ID" -q 1 -d "$QDEPTH" "${@:2}"
}
stop_kublk() { peer_stop kublk "$KUBLK_ID"; }

# peer_start NAME ID ARGS...: `NAME add ARGS` (a peer's add returns once
# its daemon has started the device), then wait for /dev/ublkbID and
# print it.  peer_stop NAME ID: `NAME del -n ID`, then wait for the
# daemon to exit.
peer_start() {
    local name=$1 dev=/dev/ublkb$2 i
    shift 2
    "$name" add "$@" >"$B/$name.out" 2>&1 </dev/null || { cat "$B/$name.out" >&2; return 1; }
    for ((i = 0; i < 100; i++)); do
        [ -b "$dev" ] && { echo "$dev"; return 0; }
        sleep 0.1
    done
    cat "$B/$name.out" >&2
    echo "$dev never appeared" >&2
    return 1
}
peer_stop() {
    local i
    "$1" del -n "$2" >/dev/null
    for ((i = 0; i < 100; i++)); do
        pidof "$1" >/dev/null || return 0
        sleep 0.1
    done
    echo "$1 did not exit" >&2
    return 1
}
