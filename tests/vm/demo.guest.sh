# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# The main job, in the VM: a qcow2 image made by `qublk create` served as
# /dev/ublkbN with 2 queues, an ext4 file system made, filled and checked
# on it, the device removed, and QEMU's own check run on the image.
# Used by scripts/demo.sh on hosts whose kernel has no ublk_drv.

t_demo() {
    local img=/tmp/demo.qcow2 id
    "$QUBLK" create -f qcow2 "$img" 1G
    "$QUBLK" add -t qcow2 -q 2 "$img" >/tmp/add.out
    id=$(sed -n 's|.*/dev/ublkb\([0-9][0-9]*\).*|\1|p' /tmp/add.out | head -n 1)
    [ -n "$id" ] || fail "qublk add printed no device"
    wait_for "/dev/ublkb$id"
    "$QUBLK" list
    mkfs.ext4 -q "/dev/ublkb$id"
    mkdir -p /mnt/demo
    mount "/dev/ublkb$id" /mnt/demo
    for i in $(seq 1 20); do
        head -c $((i * 100000)) /dev/urandom >"/mnt/demo/file$i"
    done
    (cd /mnt/demo && sha256sum file* >/tmp/sums)
    umount /mnt/demo
    "$QUBLK" del -n "$id"
    qemu-img check "$img"
    "$QUBLK" info "$img"
    "$QUBLK" add -t qcow2 --read-only "$img" >/tmp/add.out
    id=$(sed -n 's|.*/dev/ublkb\([0-9][0-9]*\).*|\1|p' /tmp/add.out | head -n 1)
    wait_for "/dev/ublkb$id"
    e2fsck -fn "/dev/ublkb$id"
    mount -o ro,noload "/dev/ublkb$id" /mnt/demo
    (cd /mnt/demo && sha256sum -c /tmp/sums) >/dev/null
    umount /mnt/demo
    "$QUBLK" del -n "$id"
    echo "demo: ext4 on a qcow2 ublk device (2 queues) written, checked and read back"
}
vmtest demo t_demo
