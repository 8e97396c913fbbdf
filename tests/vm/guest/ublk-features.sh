# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-features.sh: `qublk features` names what the running
# kernel's ublk driver offers.  The oracle is what each kernel is known to
# have (Linux 6.12: recovery, unprivileged devices, ioctl encoding, user
# copy; 7.3 adds update_size, quiesce, safe_stop_dev, auto_buf_reg,
# per_io_daemon), the human and JSON outputs must agree, and a device
# created by `qublk add` carries the flags qublk uses that the driver offers.

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
        7.3) yes+=(update_size quiesce safe_stop_dev auto_buf_reg per_io_daemon) ;;
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
        for f in update_size quiesce safe_stop_dev auto_buf_reg user_copy; do
            used "$f" || fail "qublk should use $f"
        done
    else
        # user_copy alone is no use to qublk.
        ! used user_copy || fail "qublk does not use user_copy without auto_buf_reg"
    fi
    qublk features --output xml && fail "a bad --output must be refused"
    return 0
}

# A device gets zero copy where the driver offers it (7.3), unless asked
# not to; `qublk list` says which.
t_zero_copy() {
    local dev id want=false
    [ "$VMTEST_KERNEL" = 7.3 ] && want=true
    dev=$(qublk add -t null --size 64M)
    id=${dev#/dev/ublkb}
    qublk list --output json | tee "$W/list.json"
    grep -q "\"id\": $id, .*\"zero_copy\": $want," "$W/list.json" ||
        fail "$dev: zero_copy should be $want on $VMTEST_KERNEL"
    qublk del -n "$id"
    dev=$(qublk add -t null --size 64M --no-zero-copy)
    id=${dev#/dev/ublkb}
    qublk list --output json | tee "$W/list.json"
    grep -q "\"id\": $id, .*\"zero_copy\": false," "$W/list.json" ||
        fail "$dev: --no-zero-copy ignored"
    qublk del -n "$id"
}

need qublk
vmtest ublk-features t_features
vmtest ublk-zero-copy t_zero_copy
