# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-resize.sh: online resize (issue 8).  Where the ublk
# driver offers update_size (7.3): `qublk resize -n ID +SIZE` under a
# mounted ext4, while a writer fills a file through it on both queues,
# grows the image (qemu-img info), then the device (blockdev
# --getsize64); resize2fs grows the file system online; a file larger
# than the old device then fits; checksums of the files written before,
# during and after hold, e2fsck -fn is clean, and after del QEMU reads the
# whole device as the device read it (qemu-img convert | cmp).  A live
# device refuses to shrink.  raw and qcow2; the qcow2 image has 4 KiB
# clusters (an L1 entry maps 2 MiB), so the grow moves its L1 table under
# the writes, and qemu-img check is clean after del.  On a kernel without
# update_size (6.12) the resize is refused with a message naming it, and
# neither the image nor the device changes.

W=/tmp/ublk-resize
mkdir -p "$W"

devnum() { echo "${1#/dev/ublkb}"; }
size_of() { qemu-img info -U --output json "$1" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p'; }
blocks() { dumpe2fs -h "$1" 2>/dev/null | sed -n 's/^Block count: *//p'; }

resize_case() {
    local fmt=$1
    local img=$W/img.$fmt dev id before after rc
    local opts=() l1
    ublk_has update_size || skip "this kernel's ublk driver has no update_size"
    [ "$fmt" = raw ] || opts=(-o cluster_size=4096)
    qemu-img create -q -f "$fmt" "${opts[@]}" "$img" 32M
    [ "$fmt" = raw ] || l1=$(od -An -tx1 -j36 -N12 "$img")
    dev=$(qublk add -q 2 "$img")
    id=$(devnum "$dev")
    mkfs.ext4 -q -O metadata_csum "$dev"
    mkdir -p "$W/mnt"
    mount "$dev" "$W/mnt"
    dd if=/dev/urandom of="$W/mnt/a" bs=1M count=8 status=none
    sync
    before=$(blocks "$dev")
    # A live device does not shrink.
    rc=0; qublk resize -n "$id" 16M 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" = 1 ] && grep -q 'cannot shrink' "$W/err" || fail "a shrink of a live device: exit $rc"
    # Grow it under the mounted file system, while a writer keeps both
    # queues busy (O_DIRECT: the writes reach the device meanwhile).
    dd if=/dev/urandom of="$W/mnt/c" bs=64k count=256 oflag=direct status=none &
    local writer=$!
    sleep 0.2
    qublk resize -n "$id" +96M | tee "$W/out"
    wait "$writer" || fail "the writer failed during the resize"
    grep -qx "$dev: $((128 << 20)) bytes" "$W/out"
    if [ "$fmt" = qcow2 ]; then
        # l1_size and l1_table_offset: the table grew and moved.
        [ "$(od -An -tx1 -j36 -N12 "$img")" != "$l1" ] || fail "the L1 table did not move"
    fi
    [ "$(size_of "$img")" = $((128 << 20)) ] || fail "qemu-img info: $(size_of "$img") bytes"
    [ "$(blockdev --getsize64 "$dev")" = $((128 << 20)) ] || fail "the device did not grow"
    resize2fs "$dev"
    after=$(blocks "$dev")
    echo "ext4 blocks: $before -> $after"
    [ "$after" -gt $((before * 2)) ] || fail "the file system did not grow"
    # More than the old device held.
    dd if=/dev/urandom of="$W/mnt/b" bs=1M count=40 status=none
    (cd "$W/mnt" && sha256sum a b c) >"$W/sums"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    (cd "$W/mnt" && sha256sum -c "$W/sums")
    umount "$W/mnt"
    e2fsck -fn "$dev"
    dd if="$dev" of="$W/dev.raw" bs=1M iflag=direct status=none
    qublk del -n "$id"
    [ "$(size_of "$img")" = $((128 << 20)) ]
    if [ "$fmt" = qcow2 ]; then qemu-img check "$img"; fi
    qemu-img convert -f "$fmt" -O raw "$img" "$W/qemu.raw"
    cmp "$W/dev.raw" "$W/qemu.raw"
    rm -f "$W/dev.raw" "$W/qemu.raw" "$img" "$W/sums"
}

t_resize_raw() { resize_case raw; }
t_resize_qcow2() { resize_case qcow2; }

# Without update_size: refused, naming it; nothing changes.
t_resize_refused() {
    ! ublk_has update_size || skip "this kernel's ublk driver has update_size"
    local img=$W/r.raw dev id rc
    truncate -s 64M "$img"
    dev=$(qublk add "$img")
    id=$(devnum "$dev")
    rc=0; qublk resize -n "$id" +64M 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" = 1 ] || fail "qublk resize without UPDATE_SIZE: exit $rc"
    grep -q 'no UPDATE_SIZE' "$W/err" || fail "the refusal does not name UPDATE_SIZE"
    [ "$(stat -c %s "$img")" = $((64 << 20)) ] || fail "the image changed"
    [ "$(blockdev --getsize64 "$dev")" = $((64 << 20)) ] || fail "the device changed"
    qublk del -n "$id"
    rm -f "$img"
}

need qublk qemu-img mkfs.ext4 e2fsck resize2fs dumpe2fs blockdev
vmtest ublk-resize-raw t_resize_raw
vmtest ublk-resize-qcow2 t_resize_qcow2
vmtest ublk-resize-refused t_resize_refused
