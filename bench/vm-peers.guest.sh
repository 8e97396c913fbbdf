# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# bench/vm-peers.guest.sh: starting and stopping the peer ublk servers in
# the bench VM, sourced by bench/vm-ublk.guest.sh and
# bench/vm-profile.guest.sh (the host passes this file and the peers'
# binaries as run.sh file arguments: /vmtest/ublksrv, /vmtest/kublk).
# Uses $B (a scratch directory) and $QDEPTH (the queue depth).

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
