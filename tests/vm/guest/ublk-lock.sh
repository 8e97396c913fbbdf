# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/guest/ublk-lock.sh: `qublk add` and image locks (src/block/lock.h).
# add daemonises and the daemon opens the image, so the locks must live in
# the daemon for as long as the device does, and a refusal must reach the
# user's stderr before add exits 1:
#   - a device on top.qcow2: qemu-io (read-write, read-only) and a second
#     add are refused, naming the daemon; add -r -U and qemu-io -r -U read
#     what was written through the device; the backing file takes a reader
#     but no writer; after del, qemu-io writes the image;
#   - qemu-io holding the image: add is refused naming qemu-io, and leaves
#     no device behind; once qemu-io exits, add works.

W=/tmp/ublk-lock
mkdir -p "$W"
WLOCK='Failed to get "write" lock'
SLOCK='Failed to get shared "write" lock'

devnum() { echo "${1#/dev/ublkb}"; }

# refused_add PATTERN... -- ARGS...: `qublk add ARGS` exits 1, prints no
# device, and its stderr holds every PATTERN.
refused_add() {
    local rc=0 p
    local -a pats=()
    while [ "$1" != -- ]; do pats+=("$1"); shift; done
    shift
    qublk add "$@" >"$W/add.out" 2>"$W/add.err" || rc=$?
    cat "$W/add.err"
    [ "$rc" = 1 ] || fail "qublk add $* exited $rc, want 1"
    [ ! -s "$W/add.out" ] || fail "a refused add printed $(cat "$W/add.out")"
    for p in "${pats[@]}"; do
        grep -qF -- "$p" "$W/add.err" || fail "qublk add $*: no '$p'"
    done
}

# qio_ok ARGS...: qemu-io ARGS succeeds, every command included.
qio_ok() {
    local rc=0
    qemu-io "$@" >"$W/q.out" 2>&1 || rc=$?
    cat "$W/q.out"
    [ "$rc" = 0 ] || fail "qemu-io $* exited $rc"
    if grep -qiE 'fail|mismatch|error' "$W/q.out"; then
        fail "qemu-io $*: a command failed"
    fi
}

# refused_qemu PATTERN -- CMD...: a QEMU tool refused with PATTERN.
refused_qemu() {
    local pat=$1 rc=0
    shift 2
    "$@" >"$W/q.out" 2>&1 || rc=$?
    cat "$W/q.out"
    [ "$rc" = 1 ] || fail "$* exited $rc, want 1"
    grep -qF -- "$pat" "$W/q.out"
    grep -qF "Is another process using the image" "$W/q.out"
}

t_add_holds() {
    local dev dev2 pid
    qemu-img create -q -f qcow2 "$W/base.qcow2" 64M
    qemu-io -f qcow2 -c 'write -P 0xa1 0 4M' "$W/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$W/top.qcow2"
    dev=$(qublk add "$W/top.qcow2")
    pid=$(qublk list --output json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
    [ -n "$pid" ] && [ -d "/proc/$pid" ]
    dd if=<(head -c $((1 << 20)) /dev/zero | tr '\0' '\132') of="$dev" bs=1M seek=1 \
        oflag=direct status=none
    sync

    # The parent has exited: the daemon holds the locks.
    refused_qemu "$WLOCK" -- qemu-io -f qcow2 -c 'read 0 512' "$W/top.qcow2"
    refused_qemu "$SLOCK" -- qemu-io -f qcow2 -r -c 'read 0 512' "$W/top.qcow2"
    refused_add "$WLOCK" "Lock byte 201 is held by pid $pid (qublk)" -- "$W/top.qcow2"
    refused_add "$SLOCK" "Lock byte 101 is held by pid $pid (qublk)" -- -r "$W/top.qcow2"
    qio_ok -f qcow2 -r -U -c 'read -P 0x5a 1M 1M' -c 'read -P 0xa1 0 1M' "$W/top.qcow2"
    dev2=$(qublk add -r -U "$W/top.qcow2")
    cmp <(dd if="$dev" bs=1M count=4 iflag=direct status=none) \
        <(dd if="$dev2" bs=1M count=4 iflag=direct status=none)
    qublk del -n "$(devnum "$dev2")"
    refused_qemu "$WLOCK" -- qemu-io -f qcow2 -c 'read 0 512' "$W/base.qcow2"
    qio_ok -f qcow2 -r -c 'read -P 0xa1 0 1M' "$W/base.qcow2"

    qublk del -n "$(devnum "$dev")"
    qio_ok -f qcow2 -c 'read -P 0x5a 1M 1M' -c 'write -P 0x5b 8M 64k' "$W/top.qcow2"
    qemu-img check "$W/top.qcow2"
    rm -f "$W"/*
}

t_add_refused() {
    local qpid dev
    qemu-img create -q -f qcow2 "$W/img.qcow2" 64M
    qemu-io -f qcow2 -c 'sleep 600000' "$W/img.qcow2" &
    qpid=$!
    # Ready once its fd holds lock byte 201 (qemu-io prints nothing first).
    for _ in $(seq 1 200); do
        grep -qE '^lock:.* 201 20[13]$' /proc/"$qpid"/fdinfo/* 2>/dev/null && break
        sleep 0.1
    done
    refused_add "$WLOCK" "Lock byte 201 is held by pid $qpid (qemu-io)" -- "$W/img.qcow2"
    refused_add "$SLOCK" "held by pid $qpid (qemu-io)" -- -r "$W/img.qcow2"
    if ls /dev/ublkb* >/dev/null 2>&1; then fail "a refused add left a device"; fi
    kill -TERM "$qpid"
    wait "$qpid" || true
    dev=$(qublk add "$W/img.qcow2")
    [ -b "$dev" ]
    qublk del -n "$(devnum "$dev")"
    qemu-img check "$W/img.qcow2"
    rm -f "$W"/*
}

need qublk qemu-img qemu-io cmp
vmtest ublk-lock-add-holds t_add_holds
vmtest ublk-lock-add-refused t_add_refused
t_clean() { qublk del --all; ! ls /dev/ublkb* >/dev/null 2>&1; }
vmtest ublk-lock-clean t_clean
