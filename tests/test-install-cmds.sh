#!/bin/bash
# SPDX-License-Identifier: MIT
# The commands behind the system integration, on the host (no ublk here;
# tests/test-install-vm.sh runs them against live devices):
#  - `qublk udev-id`: the image ID from a state file against coreutils'
#    `realpath -s -m` and systemd's `systemd-escape --path` (the oracle
#    the README gives users), long paths hashed, device names accepted and
#    refused, a null target (no ID), a target field that is not a word,
#    no state file;
#  - `qublk service show`: the `add` command line of /etc/qublk/NAME.conf
#    files, every bad line refused with its file:line and exit 2 (the
#    unit's RestartPreventExitStatus);
#  - `qublk service stop`: nothing to do without $MAINPID, SIGTERM to a
#    daemon that has no device yet, a bad $MAINPID refused.
. "$(dirname "$0")/lib.sh"
[ -x "$QUBLK" ] || skip "$QUBLK not built"
requires realpath systemd-escape
# With a ublk driver, udev-id asks it first; the state-file-only cases
# below are for hosts without one (the VM test covers the driver).
[ ! -e /dev/ublk-control ] || skip "this host has /dev/ublk-control: see test-install-vm"

export QUBLK_RUN_DIR=$TMPD/run
mkdir -p "$QUBLK_RUN_DIR" "$TMPD/etc"

state() {   # state ID IMAGE [TARGET]
    printf 'id=%s\npid=4242\ntarget=%s\nqueues=1\ndepth=64\nread_only=0\nforce_share=0\ndirect=1\nsize=0\nflags=0\nimage=%s\n' \
        "$1" "${3:-qcow2}" "$2" >"$QUBLK_RUN_DIR/ublk$1"
}

# ---- udev-id: the ID against the oracle
long=/srv/$(printf 'd%.0s' {1..150})/$(printf 'x%.0s' {1..60}).qcow2
n=0
for img in /var/lib/qublk/vm-1.qcow2 '/a//b/./c/../d.img' '/with space/ü,é.qcow2' \
    /.hidden/x.raw '/x/.dot/y-z_w:v.qcow2' '/a/b/../../../top.img' "$long"; do
    n=$((n + 1))
    state "$n" "$img"
    "$QUBLK" udev-id "ublkb$n" >"$TMPD/out" || fail "udev-id ublkb$n exited $?"
    norm=$(realpath -s -m "$img")
    want=$(systemd-escape --path "$norm")
    got=$(sed -n 's/^ID_SERIAL=//p' "$TMPD/out")
    if [ ${#want} -le 200 ]; then
        [ "$got" = "$want" ] || fail "$img: ID '$got', systemd-escape says '$want'"
    else
        [[ $got =~ ^hash-[0-9a-f]{16}$ ]] || fail "long path: ID '$got' is not a hash"
    fi
    grep -qx "QUBLK_DEV_ID=$n" "$TMPD/out" || fail "no QUBLK_DEV_ID=$n"
    grep -qx "QUBLK_TARGET=qcow2" "$TMPD/out" || fail "no QUBLK_TARGET"
    grep -qx "QUBLK_READ_ONLY=0" "$TMPD/out" || fail "no QUBLK_READ_ONLY"
done
# The same image named two ways is one ID; different images differ.
state 20 /srv/a/../b.qcow2
state 21 /srv//b.qcow2
state 22 /srv/b-c.qcow2
state 23 /srv/b/c.qcow2
for i in 20 21 22 23; do "$QUBLK" udev-id "ublkb$i" | sed -n 's/^ID_SERIAL=//p' >"$TMPD/id$i"; done
cmp -s "$TMPD/id20" "$TMPD/id21" || fail "/srv/a/../b.qcow2 and /srv//b.qcow2 have different IDs"
! cmp -s "$TMPD/id22" "$TMPD/id23" || fail "/srv/b-c.qcow2 and /srv/b/c.qcow2 share an ID"
# Two long paths that differ only at the start hash differently.
state 24 "/srv/a$long"
state 25 "/srv/b$long"
[ "$("$QUBLK" udev-id ublkb24)" != "$("$QUBLK" udev-id ublkb25)" ] || fail "two long paths, one ID"

# Device names: disk, partition, char device, /dev path.
for name in ublkb1 /dev/ublkb1 ublkc1 ublkb1p3 /dev/ublkb1p12; do
    "$QUBLK" udev-id "$name" >"$TMPD/out2" || fail "udev-id $name exited $?"
    grep -qx 'QUBLK_DEV_ID=1' "$TMPD/out2" || fail "udev-id $name: wrong device"
done
for name in ublkb ublkbx ublkb1x ublkc1p2 ublkb1p ublkb-1 sda ublk-control ublkb99999999999; do
    rc=0; "$QUBLK" udev-id "$name" >"$TMPD/out2" 2>"$TMPD/err" || rc=$?
    [ $rc = 2 ] || fail "udev-id $name: exit $rc, expected 2"
    [ ! -s "$TMPD/out2" ] || fail "udev-id $name printed something"
done
# No state file (and no driver): exit 1, nothing for udev.
rc=0; "$QUBLK" udev-id ublkb77 >"$TMPD/out2" 2>"$TMPD/err" || rc=$?
[ $rc = 1 ] && [ ! -s "$TMPD/out2" ] || fail "udev-id of a missing device: exit $rc"
# The null target has no image: no ID.  A target that is not a word is
# not passed on to udev.
state 30 - null
"$QUBLK" udev-id ublkb30 >"$TMPD/out2"
! grep -q ID_SERIAL "$TMPD/out2" || fail "null target got an ID"
grep -qx QUBLK_TARGET=null "$TMPD/out2" || fail "null target: no QUBLK_TARGET"
state 31 /a.img 'qcow2 x'
"$QUBLK" udev-id ublkb31 >"$TMPD/out2"
! grep -q QUBLK_TARGET "$TMPD/out2" || fail "a target with a space was passed on"
state 32 relative/path.img
"$QUBLK" udev-id ublkb32 >"$TMPD/out2" 2>/dev/null
! grep -q ID_SERIAL "$TMPD/out2" || fail "a relative image path got an ID"

# ---- service show: configuration -> add command line
conf() { printf '%b' "$2" >"$TMPD/etc/$1.conf"; }
show() { "$QUBLK" service show -C "$TMPD/etc" "$1"; }
conf full '# a comment\n\n  image = /var/lib/my vm.qcow2  \ntarget=qcow2\nqueues = 2\ndepth=128\nread-only=yes\ncache = writeback\nnumber=7\n'
[ "$(show full)" = "qublk add --foreground -t qcow2 -q 2 -d 128 -n 7 --read-only --cache writeback '/var/lib/my vm.qcow2'" ] \
    || fail "show full: $(show full)"
conf min 'image=/srv/a.img\n'
[ "$(show min)" = "qublk add --foreground /srv/a.img" ] || fail "show min: $(show min)"
conf rw 'image=/srv/it'"'"'s.img\nread-only=off\ncache=none\ntarget=raw\n'
[ "$(show rw)" = "qublk add --foreground -t raw --cache none '/srv/it'\\''s.img'" ] || fail "show rw: $(show rw)"
# What show prints is a command line a shell runs as such.
eval "set -- $(show full)"
[ "$#" = 15 ] && [ "${15}" = "/var/lib/my vm.qcow2" ] || fail "show full does not parse back"

bad() {   # bad NAME CONTENT EXPECTED-MESSAGE
    conf "$1" "$2"
    rc=0; show "$1" >"$TMPD/out" 2>"$TMPD/err" || rc=$?
    [ $rc = 2 ] || fail "bad conf $1: exit $rc, expected 2"
    grep -qF -- "$3" "$TMPD/err" || fail "bad conf $1: '$(cat "$TMPD/err")' lacks '$3'"
}
bad rel 'image=rel.img\n' "rel.conf:1: image 'rel.img': expected an absolute path"
bad noimg 'queues=2\n' "noimg.conf: no image = PATH"
bad unknown 'image=/a\nsize=1G\n' "unknown.conf:2: unknown key 'size'"
bad twice 'image=/a\nimage=/b\n' "twice.conf:2: 'image' given twice"
bad noeq 'image=/a\nread-only\n' "noeq.conf:2: expected key = value"
bad q0 'image=/a\nqueues=0\n' "q0.conf:2: queues '0': expected 1..64"
bad q65 'image=/a\nqueues=65\n' "q65.conf:2: queues '65'"
bad qx 'image=/a\nqueues=2x\n' "qx.conf:2: queues '2x'"
bad d0 'image=/a\ndepth=0\n' "d0.conf:2: depth '0'"
bad ro 'image=/a\nread-only=maybe\n' "ro.conf:2: read-only 'maybe'"
bad cache 'image=/a\ncache=unsafe\n' "cache.conf:2: cache 'unsafe'"
bad tgt 'image=/a\ntarget=null\n' "tgt.conf:2: target 'null'"
bad num 'image=/a\nnumber=-1\n' "num.conf:2: number '-1'"
bad long "image=/$(printf 'a%.0s' {1..5000})\n" "long.conf:1: line too long"
rc=0; show missing 2>"$TMPD/err" || rc=$?
[ $rc = 2 ] && grep -q 'missing.conf: No such file' "$TMPD/err" || fail "missing conf: exit $rc"
for args in "show" "show a b" "restart full" "show ../full" "show .x" "show a/b" "show ''"; do
    rc=0; eval "\"\$QUBLK\" service -C \"\$TMPD/etc\" $args" >/dev/null 2>&1 || rc=$?
    [ $rc = 2 ] || fail "service $args: exit $rc, expected 2"
done
# start reads the configuration first: a bad one is exit 2, never a device.
rc=0; "$QUBLK" service start -C "$TMPD/etc" rel 2>/dev/null || rc=$?
[ $rc = 2 ] || fail "service start with a bad conf: exit $rc"

# ---- service stop
rc=0; env -u MAINPID SERVICE_RESULT=signal "$QUBLK" service stop x 2>"$TMPD/err" || rc=$?
[ $rc = 0 ] && grep -q 'left to the restart' "$TMPD/err" || fail "stop without MAINPID: exit $rc"
rc=0; MAINPID=12x "$QUBLK" service stop x 2>/dev/null || rc=$?
[ $rc = 2 ] || fail "stop with MAINPID=12x: exit $rc"
# A main process with no device (no state file names it): SIGTERM.
sleep 60 &
sp=$!
MAINPID=$sp "$QUBLK" service stop x 2>"$TMPD/err" || fail "stop of a daemon without device failed"
rc=0; wait "$sp" || rc=$?
[ $rc = $((128 + 15)) ] || fail "the main process was not sent SIGTERM (exit $rc)"
echo "PASS: $TEST_NAME"
