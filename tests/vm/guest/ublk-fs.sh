# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-fs.sh: a file system on a qublk device survives del
# and add (issue 3 acceptance): mkfs.ext4, mount, a tree of files with known
# sha256, umount, `qublk del`, `qublk add` again, e2fsck -fn clean, the
# checksums match; the image passes qemu-img check.  Also SIGTERM to the
# daemon behaves like `qublk del`.

W=/tmp/ublk-fs
mkdir -p "$W" "$W/mnt"
devnum() { echo "${1#/dev/ublkb}"; }
# daemon_gone PID: exited (a zombie has closed its files) or reaped.
daemon_gone() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
    [ -z "$st" ] || [ "$st" = Z ]
}

fs_case() {
    local fmt=$1 img dev i pid
    img=$W/fs.$fmt
    qemu-img create -q -f "$fmt" "$img" 256M
    dev=$(qublk add -t "$fmt" "$img")
    mkfs.ext4 -q -F "$dev"
    mount -t ext4 "$dev" "$W/mnt"
    mkdir -p "$W/mnt/a/b/c"
    for i in 1 2 3 4 5 6 7 8; do
        head -c $((i * 300000 + 4097)) /dev/urandom >"$W/mnt/a/f$i"
        head -c $((i * 7001)) /dev/urandom >"$W/mnt/a/b/c/g$i"
    done
    dd if=/dev/urandom of="$W/mnt/big" bs=1M count=24 status=none
    (cd "$W/mnt" && find . -type f | sort | xargs sha256sum) >"$W/sums"
    umount "$W/mnt"
    qublk del -n "$(devnum "$dev")"
    [ "$fmt" != qcow2 ] || qemu-img check "$img"

    dev=$(qublk add -t "$fmt" "$img")
    e2fsck -fn "$dev"
    mount -t ext4 -o ro "$dev" "$W/mnt"
    (cd "$W/mnt" && sha256sum -c --quiet "$W/sums")
    umount "$W/mnt"
    # SIGTERM to the daemon does what del does.  The device node goes at
    # STOP_DEV, before the daemon closes the image: wait for the daemon
    # itself (gone or a zombie), whose image locks would refuse qemu-img.
    pid=$(qublk list --output json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -n 1)
    kill -TERM "$pid"
    for i in $(seq 1 100); do
        if [ ! -e "$dev" ] && daemon_gone "$pid"; then break; fi
        sleep 0.1
    done
    [ ! -e "$dev" ]
    daemon_gone "$pid"
    [ "$fmt" != qcow2 ] || qemu-img check "$img"
    rm -f "$img" "$W/sums"
}

t_fs_qcow2() { fs_case qcow2; }
t_fs_raw() { fs_case raw; }

need qublk mkfs.ext4 e2fsck qemu-img sha256sum
vmtest ublk-ext4-qcow2 t_fs_qcow2
vmtest ublk-ext4-raw t_fs_raw
