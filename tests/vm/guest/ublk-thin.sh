# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-thin.sh: thin provisioning through ublk, `qublk add
# --discard unmap|ignore` (issue 12).
#
# unmap (the default for a writable image): ext4 on a qcow2 device, a
# file kept and a big one written and deleted.  With the file system
# unmounted, its free extents are listed (dumpe2fs) and the image copied.
# Then fstrim through the device; after del the image's allocated size
# (du) must have fallen far below what it was, to within 10% (+1 MiB of
# metadata) of the clusters qemu-img check still counts allocated, and
# what it gave back must be within 10% of what QEMU gives back for the
# same discards: the copy gets the free extents fstrim trims (those of at
# least one cluster: the device's discard granularity) as `qemu-io -d
# unmap` discards.  Both
# images are clean (qemu-img check); the device read-only again: e2fsck
# -fn clean, the kept file's checksum intact.
#
# ignore: the device advertises no discard (sysfs discard_max_bytes 0;
# fstrim and blkdiscard refused as unsupported, du does not fall), while
# write-zeroes still works (blkdiscard -z: zeros read back); the image is
# clean.  Read-only devices advertise neither.

W=/tmp/ublk-thin
CLUSTER=65536
mkdir -p "$W" "$W/mnt"
devnum() { echo "${1#/dev/ublkb}"; }
kib() { du -k "$1" | cut -f1; }
sysq() { cat "/sys/block/${1#/dev/}/queue/$2"; }

# add_dev OUT ARGS...: qublk add ARGS, the device path in $OUT's file.
# (A file, not $(...): nothing of the daemon may hold our pipe.)
add_dev() {
    local out=$1; shift
    qublk add "$@" >"$W/$out.add"
    cat "$W/$out.add"
}

# free_extents DEV: "OFFSET LENGTH" in bytes of each free extent of the
# ext4 on DEV of at least one cluster (dumpe2fs "Free blocks: a-b, c").
free_extents() {
    local bs
    bs=$(dumpe2fs -h "$1" 2>/dev/null | awk -F: '/^Block size/ { print $2 + 0 }')
    dumpe2fs "$1" 2>/dev/null | sed -n 's/^  *Free blocks: *//p' | tr ',' '\n' |
        awk -v bs="$bs" -v min="$CLUSTER" 'NF {
            n = split($1, r, "-"); a = r[1]; b = (n > 1) ? r[2] : r[1]
            len = (b - a + 1) * bs
            if (len >= min) printf "%d %d\n", a * bs, len }'
}

t_thin_unmap() {
    local img=$W/u.qcow2 ref=$W/u-qemu.qcow2 dev before after ref_before qemu alloc n
    local -a cmds=()
    qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER "$img" 512M
    dev=$(add_dev u "$img")     # the default: unmap
    [ "$(sysq "$dev" discard_max_bytes)" -gt 0 ] || fail "$dev advertises no discard"
    [ "$(sysq "$dev" discard_granularity)" = "$CLUSTER" ]
    [ "$(sysq "$dev" write_zeroes_max_bytes)" -gt 0 ]
    mkfs.ext4 -q -b 4096 -E nodiscard "$dev"
    mount "$dev" "$W/mnt"
    dd if=/dev/urandom of="$W/mnt/keep" bs=1M count=8 status=none
    dd if=/dev/zero bs=1M count=96 status=none | tr '\0' 'x' >"$W/mnt/big"
    sync
    (cd "$W/mnt" && sha256sum keep) >"$W/keep.sum"
    rm "$W/mnt/big"
    umount "$W/mnt"
    free_extents "$dev" >"$W/free"
    qublk del -n "$(devnum "$dev")"
    before=$(kib "$img")
    # A sparse copy (GNU dd; busybox cp has no --sparse): zero blocks
    # become holes, so the two are compared by what they give back.
    dd if="$img" of="$ref" bs=4k conv=sparse status=none
    ref_before=$(kib "$ref")

    # fstrim through the device.
    dev=$(add_dev u2 "$img")
    mount "$dev" "$W/mnt"
    fstrim -v "$W/mnt"
    umount "$W/mnt"
    qublk del -n "$(devnum "$dev")"
    after=$(kib "$img")

    # The same discards through QEMU (its discard=unmap punches the
    # clusters it frees out of the file).
    while read -r off len; do cmds+=(-c "discard $off $len"); done <"$W/free"
    n=${#cmds[@]}
    [ "$n" -gt 0 ] || fail "no free extents listed"
    qemu-io -d unmap -f qcow2 "${cmds[@]}" "$ref" >/dev/null
    qemu=$(kib "$ref")

    qemu-img check "$img"
    qemu-img check "$ref"
    alloc=$(qemu-img check --output=json "$img" |
        awk -F'[:,]' -v c="$CLUSTER" '/"allocated-clusters"/ { print $2 * c / 1024 }')
    local freed=$((before - after)) qfreed=$((ref_before - qemu))
    echo "du: qublk ${before} -> ${after} KiB (${freed} freed), QEMU ${ref_before} ->" \
        "${qemu} KiB (${qfreed} freed, $((n / 2)) discards); allocated clusters ${alloc} KiB"
    [ "$after" -lt $((before / 2)) ] || fail "fstrim gave back too little"
    [ "$after" -le $((alloc * 11 / 10 + 1024)) ] || fail "freed clusters still take space"
    local diff=$((freed - qfreed))
    [ "${diff#-}" -le $((qfreed / 10 + 256)) ] || fail "qublk freed ${freed} KiB, QEMU ${qfreed} KiB"

    # The data is intact.
    dev=$(add_dev u3 --read-only "$img")
    [ "$(sysq "$dev" discard_max_bytes)" = 0 ] || fail "a read-only device advertises discard"
    e2fsck -fn "$dev"
    mount -o ro "$dev" "$W/mnt"
    (cd "$W/mnt" && sha256sum -c "$W/keep.sum")
    umount "$W/mnt"
    qublk del -n "$(devnum "$dev")"
    rm -f "$img" "$ref"
}

t_thin_ignore() {
    local img=$W/i.qcow2 dev before after rc
    qemu-img create -q -f qcow2 -o cluster_size=$CLUSTER "$img" 128M
    dev=$(add_dev i --discard ignore "$img")
    [ "$(sysq "$dev" discard_max_bytes)" = 0 ] || fail "$dev advertises discard"
    [ "$(sysq "$dev" write_zeroes_max_bytes)" -gt 0 ] || fail "$dev has no write-zeroes"
    dd if=/dev/zero bs=1M count=32 status=none | tr '\0' 'y' |
        dd of="$dev" bs=1M oflag=direct status=none
    sync
    before=$(kib "$img")
    rc=0; blkdiscard -o 0 -l 32M "$dev" 2>"$W/err" || rc=$?
    cat "$W/err"
    [ "$rc" != 0 ] || fail "blkdiscard succeeded on a device without discard"
    # Write-zeroes works, and keeps the clusters (no unmap).
    blkdiscard -z -o 0 -l 32M "$dev"
    cmp -n $((32 << 20)) "$dev" /dev/zero
    mkfs.ext4 -q -E nodiscard "$dev"
    mount "$dev" "$W/mnt"
    rc=0; fstrim "$W/mnt" 2>"$W/err" || rc=$?
    cat "$W/err"
    umount "$W/mnt"
    [ "$rc" != 0 ] || fail "fstrim succeeded on a device without discard"
    qublk del -n "$(devnum "$dev")"
    after=$(kib "$img")
    echo "du: ${before} KiB before, ${after} KiB after"
    [ "$after" -ge $((before * 9 / 10)) ] || fail "--discard ignore gave space back"
    qemu-img check "$img"
    rm -f "$img"
}

need qublk qemu-img qemu-io mkfs.ext4 e2fsck dumpe2fs fstrim blkdiscard sha256sum cmp
vmtest ublk-thin-unmap t_thin_unmap
vmtest ublk-thin-ignore t_thin_ignore
