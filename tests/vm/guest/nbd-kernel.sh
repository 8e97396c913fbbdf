# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/nbd-kernel.sh: the kernel's NBD client (nbd.ko, Debian's
# nbd-client) against `qublk nbd` running in the guest, over a unix socket
# with 4 connections (multi-conn):
#   - ext4 on /dev/nbd0: a tree of files with known sha256, a deleted
#     file trimmed with fstrim; disconnect, reconnect, e2fsck -fn clean,
#     the checksums match;
#   - blkdiscard of a written range past the file system reads back as
#     zeros, and after the server exits qemu-img map shows it unallocated;
#   - the server exits 0 on SIGTERM, qemu-img check is clean.

W=/tmp/nbd-kernel
SOCK=$W/nbd.sock
SRV_PID=

serve() { # IMG
    rm -f "$SOCK"
    qublk nbd --socket "$SOCK" --shared 8 "$1" >"$W/server.log" 2>&1 &
    SRV_PID=$!
    wait_for "$SOCK" 20
}

stop_server() {
    local rc=0
    kill -TERM "$SRV_PID"
    wait "$SRV_PID" || rc=$?
    SRV_PID=
    cat "$W/server.log"
    [ "$rc" = 0 ] || fail "qublk nbd exited $rc on SIGTERM"
}

# nsock: sockets the server holds (the listener plus one per connection).
nsock() {
    local f n=0
    for f in "/proc/$SRV_PID/fd/"*; do
        case $(readlink "$f") in socket:*) n=$((n + 1)) ;; esac
    done
    echo "$n"
}

# connect: /dev/nbd0 over 4 connections; fail unless the server holds 4.
connect() {
    local n
    nbd-client -unix "$SOCK" /dev/nbd0 -b 4096 -C 4
    for _ in $(seq 1 50); do
        [ "$(blockdev --getsize64 /dev/nbd0 2>/dev/null || echo 0)" -gt 0 ] && break
        sleep 0.1
    done
    n=$(nsock)
    [ "$n" -ge 5 ] || fail "server holds $n sockets: not 4 connections"
}

disconnect() {
    nbd-client -d /dev/nbd0
    # The kernel drops its connections; wait until the server saw them go.
    for _ in $(seq 1 100); do
        [ "$(nsock)" -le 1 ] && return 0
        sleep 0.1
    done
    fail "connections still open after nbd-client -d"
}

t_nbd_ext4() {
    local img=$W/disk.qcow2 i
    mkdir -p "$W/mnt"
    qemu-img create -q -f qcow2 "$img" 256M
    serve "$img"
    connect
    [ "$(blockdev --getsize64 /dev/nbd0)" = $((256 << 20)) ] || fail "wrong /dev/nbd0 size"

    # ext4 on the first 192 MiB; the rest is for blkdiscard.
    mkfs.ext4 -q -F /dev/nbd0 192M
    mount -t ext4 -o discard /dev/nbd0 "$W/mnt"
    mkdir -p "$W/mnt/a/b"
    for i in 1 2 3 4 5 6; do
        head -c $((i * 250000 + 4097)) /dev/urandom >"$W/mnt/a/f$i"
        head -c $((i * 7001)) /dev/urandom >"$W/mnt/a/b/g$i"
    done
    dd if=/dev/urandom of="$W/mnt/big" bs=1M count=16 status=none
    dd if=/dev/urandom of="$W/mnt/gone" bs=1M count=8 status=none
    sync
    rm "$W/mnt/gone"
    fstrim -v "$W/mnt" || true     # -o discard already trimmed it; either way
    (cd "$W/mnt" && find . -type f | sort | xargs sha256sum) >"$W/sums"
    umount "$W/mnt"

    # A written range past the file system, then discarded: zeros.
    dd if=/dev/urandom of=/dev/nbd0 bs=1M seek=200 count=32 oflag=direct status=none
    blkdiscard -o $((200 << 20)) -l $((32 << 20)) /dev/nbd0
    dd if=/dev/nbd0 of="$W/range" bs=1M skip=200 count=32 iflag=direct status=none
    cmp -n $((32 << 20)) "$W/range" /dev/zero || fail "a discarded range does not read back as zeros"
    rm -f "$W/range"
    sync
    disconnect

    # Reconnect: the file system and the data are intact.
    connect
    e2fsck -fn /dev/nbd0
    mount -t ext4 -o ro /dev/nbd0 "$W/mnt"
    (cd "$W/mnt" && sha256sum -c --quiet "$W/sums")
    umount "$W/mnt"
    disconnect
    stop_server

    qemu-img check "$img"
    # The discarded range is no longer allocated in the image.
    qemu-img map --output=json -f qcow2 "$img" >"$W/map.json"
    awk -v s=$((200 << 20)) -v e=$((232 << 20)) '
        match($0, /"start": [0-9]+/) { st = substr($0, RSTART + 9, RLENGTH - 9) + 0 }
        match($0, /"length": [0-9]+/) { ln = substr($0, RSTART + 10, RLENGTH - 10) + 0 }
        /"data": true/ { if (st < e && st + ln > s) bad = 1 }
        END { exit bad }' "$W/map.json" || { cat "$W/map.json"; fail "discarded range still allocated"; }
}

need qublk nbd-client mkfs.ext4 e2fsck qemu-img sha256sum blkdiscard blockdev fstrim
[ -b /dev/nbd0 ] || skip "no /dev/nbd0 (nbd.ko not loaded)"
mkdir -p "$W"
vmtest nbd-kernel-ext4 t_nbd_ext4
