# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-features.sh: `qublk features` names what the running
# kernel's ublk driver offers.  The oracle is what each kernel is known to
# have (Linux 6.12: recovery, unprivileged devices, ioctl encoding, user
# copy; 7.3 adds update_size, quiesce, safe_stop_dev, auto_buf_reg,
# per_io_daemon), the human and JSON outputs must agree, and a device
# created by `qublk add` carries the flags qublk uses that the driver offers;
# a shallow queue's thread is pinned to the first CPU of its queue's map
# when that map spans more than one CPU.

W=/tmp/ublk-features
mkdir -p "$W"

# supported NAME: the JSON says the driver supports NAME.
supported() { grep -q "{\"name\": \"$1\", \"bit\": [0-9]*, \"supported\": true" "$W/f.json"; }
# used NAME: ... and that qublk uses it.
used() { grep -q "{\"name\": \"$1\", \"bit\": [0-9]*, \"supported\": true, \"used\": true" "$W/f.json"; }

t_features() {
    qublk features | tee "$W/f.txt"
    qublk features --output json | tee "$W/f.json"
    grep -q "\"kernel\": \"$(uname -r)\"" "$W/f.json"
    local yes=(user_recovery user_recovery_reissue unprivileged_dev cmd_ioctl_encode user_copy)
    local no=() f
    case $VMTEST_KERNEL in
        6.12) no=(update_size quiesce safe_stop_dev auto_buf_reg per_io_daemon batch_io) ;;
        7.3) yes+=(update_size quiesce safe_stop_dev auto_buf_reg per_io_daemon batch_io) ;;
        *) fail "unknown kernel '$VMTEST_KERNEL'" ;;
    esac
    for f in "${yes[@]}"; do
        supported "$f" || fail "$f not reported on $VMTEST_KERNEL"
        grep -Eq "^$f +yes " "$W/f.txt" || fail "human output disagrees on $f"
    done
    for f in "${no[@]}"; do
        ! supported "$f" || fail "$f reported on $VMTEST_KERNEL, which lacks it"
        grep -Eq "^$f +no " "$W/f.txt" || fail "human output disagrees on $f"
    done
    # What qublk uses of what is there.
    for f in user_recovery user_recovery_reissue cmd_ioctl_encode unprivileged_dev; do
        used "$f" || fail "qublk should use $f"
    done
    if [ "$VMTEST_KERNEL" = 7.3 ]; then
        # Zero copy: auto_buf_reg, with user_copy for what the daemon
        # must touch itself.
        for f in update_size quiesce safe_stop_dev auto_buf_reg user_copy batch_io; do
            used "$f" || fail "qublk should use $f"
        done
    else
        # user_copy alone only on request.
        ! used user_copy || fail "qublk uses user_copy alone only with QUBLK_USER_COPY=1"
        QUBLK_USER_COPY=1 qublk features --output json > "$W/f.json"
        used user_copy || fail "QUBLK_USER_COPY=1: features should say user_copy is used"
        QUBLK_USER_COPY=1 qublk features | grep -Eq "^user_copy +yes +uses " ||
            fail "QUBLK_USER_COPY=1: human output disagrees on user_copy"
        qublk features --output json > "$W/f.json"
    fi
    qublk features --output xml && fail "a bad --output must be refused"
    return 0
}

# A device gets zero copy and batches where the driver offers them (7.3),
# unless asked not to; `qublk list` says which.
t_zero_copy() {
    local dev id want=false
    [ "$VMTEST_KERNEL" = 7.3 ] && want=true
    dev=$(qublk add -t null --size 64M)
    id=${dev#/dev/ublkb}
    qublk list --output json | tee "$W/list.json"
    grep -q "\"id\": $id, .*\"zero_copy\": $want, \"batch\": $want," "$W/list.json" ||
        fail "$dev: zero_copy and batch should be $want on $VMTEST_KERNEL"
    qublk del -n "$id"
    dev=$(qublk add -t null --size 64M --no-zero-copy)
    id=${dev#/dev/ublkb}
    qublk list --output json | tee "$W/list.json"
    grep -q "\"id\": $id, .*\"zero_copy\": false, \"batch\": $want," "$W/list.json" ||
        fail "$dev: --no-zero-copy ignored, or it changed batch"
    qublk del -n "$id"
    dev=$(qublk add -t null --size 64M --no-batch)
    id=${dev#/dev/ublkb}
    qublk list --output json | tee "$W/list.json"
    grep -q "\"id\": $id, .*\"zero_copy\": $want, \"batch\": false," "$W/list.json" ||
        fail "$dev: --no-batch ignored, or it changed zero copy"
    qublk del -n "$id"
    # Depth 1: no batches (the 7.3 driver refuses them there), and the
    # device works.
    dev=$(qublk add -t null --size 64M -d 1)
    id=${dev#/dev/ublkb}
    qublk list --output json | tee "$W/list.json"
    grep -q "\"id\": $id, .*\"zero_copy\": $want, \"batch\": false," "$W/list.json" ||
        fail "$dev: a queue of depth 1 should not be batched"
    dd if="$dev" of=/dev/null bs=4k count=256 iflag=direct status=none
    qublk del -n "$id"
}

# thread_cpus COMM: the Cpus_allowed_list of the thread named COMM (one
# device at a time here, so the name is unique).
thread_cpus() {
    local t
    for t in /proc/[0-9]*/task/[0-9]*; do
        [ "$(cat "$t/comm" 2>/dev/null)" = "$1" ] || continue
        awk '/^Cpus_allowed_list:/ { print $2 }' "$t/status"
        return 0
    done
    fail "no thread $1"
}

# A shallow queue's thread is pinned to the first CPU of its queue's map
# when that map spans more than one CPU (the oracle: the block layer's own
# /sys/block/ublkbN/mq/Q/cpu_list); a queue of one CPU's requests, and a
# deep queue, float over every CPU the daemon may use.
t_queue_pin() {
    local dev id q first got all n
    all=$(cat /sys/devices/system/cpu/online)
    [ "$all" = 0-1 ] || skip "written for two CPUs, not '$all'"
    truncate -s 64M "$W/pin.raw"
    # One queue: all the CPUs' requests; pinned to the first.
    dev=$(qublk add -t raw -q 1 -d 2 "$W/pin.raw")
    id=${dev#/dev/ublkb}
    cat "/sys/block/ublkb$id/mq/0/cpu_list"
    first=$(tr -c '0-9' ' ' <"/sys/block/ublkb$id/mq/0/cpu_list" | awk '{ print $1 }')
    n=$(tr -c '0-9' ' ' <"/sys/block/ublkb$id/mq/0/cpu_list" | wc -w)
    [ "$n" = 2 ] || fail "one queue maps $n CPUs, not 2"
    got=$(thread_cpus qublk-q0)
    [ "$got" = "$first" ] || fail "one queue, depth 2: qublk-q0 runs on '$got', want '$first'"
    # The pinned queue still moves data, from both CPUs' submitters.
    fio --name=pin --filename="$dev" --rw=randwrite --bs=4k --size=16M \
        --verify=crc32c --verify_fatal=1 --ioengine=libaio --direct=1 --iodepth=4 \
        --numjobs=2 --offset_increment=16M --group_reporting >/dev/null ||
        fail "fio --verify through the pinned queue failed"
    qublk del -n "$id"
    rm -f "$W/pin.raw"
    # Two queues, one CPU each: pinned there, a thread would share its CPU
    # with every submitter of its requests.  They float.
    dev=$(qublk add -t null --size 64M -q 2 -d 2)
    id=${dev#/dev/ublkb}
    for q in 0 1; do
        cat "/sys/block/ublkb$id/mq/$q/cpu_list"
        got=$(thread_cpus "qublk-q$q")
        [ "$got" = "$all" ] || fail "two queues, depth 2: qublk-q$q runs on '$got', want '$all'"
    done
    qublk del -n "$id"
    # A deep queue floats.
    dev=$(qublk add -t null --size 64M -q 1 -d 128)
    id=${dev#/dev/ublkb}
    got=$(thread_cpus qublk-q0)
    [ "$got" = "$all" ] || fail "depth 128: qublk-q0 runs on '$got', want '$all'"
    qublk del -n "$id"
    # Pinned only where the daemon may run: started on CPU 1 alone (mask
    # 2), its one queue's thread may not go to CPU 0, the map's first.
    dev=$(taskset 2 qublk add -t null --size 64M -q 1 -d 2)
    id=${dev#/dev/ublkb}
    got=$(thread_cpus qublk-q0)
    [ "$got" = 1 ] || fail "daemon on CPU 1: qublk-q0 runs on '$got'"
    qublk del -n "$id"
}

need qublk
vmtest ublk-features t_features
vmtest ublk-zero-copy t_zero_copy
vmtest ublk-queue-pin t_queue_pin
