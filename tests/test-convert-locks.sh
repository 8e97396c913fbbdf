#!/bin/bash
# SPDX-License-Identifier: MIT
# tests/test-convert-locks.sh: `qublk convert` holds the image locks
# `qemu-img convert` holds (QEMU's lock bytes, block/lock.h), read from
# /proc/locks while each tool runs the same job:
#   - the source and its backing file: held as read-only images (without
#     -U: consistent read held, write and resize not shared; with -U:
#     everything shared);
#   - an existing destination: create's locks (write and resize held,
#     resize not shared) while the new image is made;
#   - the image being written: held as a read-write image.  QEMU writes the
#     destination in place; qublk writes a temporary file renamed over it
#     at the end: the state QEMU's destination spends the copy in is the
#     one of qublk's temporary file, and the first one (create's) is the
#     one qublk holds on the existing destination until the rename.  (QEMU
#     also opens the destination to write the new qcow2 header, holding
#     write and resize, sharing everything; qublk writes that header into
#     its private temporary file.)
# Both tools are slowed down with strace's syscall delays (QEMU's writes
# and truncation, qublk's io_uring_enter and truncation; a delay applies
# to traced calls only) so that each state lasts; a state counts if
# several consecutive samples of /proc/locks saw it (the changes between
# two states take microseconds).
. "$(dirname "$0")/lib.sh"
requires qemu-img qemu-io strace
[ -x "$QUBLK" ] || skip "$QUBLK not built"
D=$TMPD

qemu-img create -q -f qcow2 "$D/base.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 1 0 2M' "$D/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$D/src.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 2 2M 2M' "$D/src.qcow2" >/dev/null

# locks_during NAME CMD...: run CMD, sample /proc/locks every 5 ms until
# it exits; print, for base, src, dst and the temporary file (tmp), one
# line "FILE LONGEST FIRST ALL" of lock states (a state: the sorted lock
# bytes held through any descriptor, "-" for none).
locks_during() {
    local name=$1; shift
    "$@" >"$D/$name.out" 2>&1 &
    local pid=$!
    "$PYTHON" - "$pid" "$D" <<'PYEOF' >"$D/$name.locks"
import glob, os, sys, time
pid, d = int(sys.argv[1]), sys.argv[2]
def ino(p):
    try:
        st = os.stat(p)
        return "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    except OSError:
        return None
fixed = {n: ino(os.path.join(d, n + ".qcow2")) for n in ("base", "src")}
runs = {}     # file -> [[state, samples], ...]
def sample():
    ids = dict(fixed)
    ids["dst"] = ino(os.path.join(d, "dst.qcow2"))
    tmps = glob.glob(os.path.join(d, ".dst.qcow2.qublk-*"))
    ids["tmp"] = ino(tmps[0]) if len(tmps) == 1 else None
    held = {}
    with open("/proc/locks") as f:
        for line in f:
            w = line.split()
            if len(w) < 8 or w[1] != "OFDLCK":
                continue
            # adjacent bytes of one lock owner show as one range
            if w[7] != "EOF" and int(w[7]) < 1024:
                held.setdefault(w[5], set()).update(range(int(w[6]), int(w[7]) + 1))
    for n, i in ids.items():
        if i is None:
            continue
        st = ",".join(str(b) for b in sorted(held.get(i, ()))) or "-"
        r = runs.setdefault(n, [])
        if r and r[-1][0] == st:
            r[-1][1] += 1
        else:
            r.append([st, 1])
while True:
    sample()
    try:     # the shell reaps it: until then it is a zombie
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
    except OSError:
        break
    time.sleep(0.005)
# Per file: the state seen longest (the one a job spends its time in),
# the first one seen in several samples in a row, and all of those, "-"
# (no lock) left out.
for n in ("base", "src", "dst", "tmp"):
    total, first = {}, "-"
    for st, k in runs.get(n, []):
        if st == "-":
            continue
        total[st] = total.get(st, 0) + k
        if first == "-" and k >= 3:
            first = st
    longest = max(total, key=total.get) if total else "-"
    stable = sorted({st for st, k in runs.get(n, []) if st != "-" and k >= 3})
    print(n, longest, first, "/".join(stable) or "-")
if os.environ.get("LOCKS_DEBUG"):
    print(runs, file=sys.stderr)
PYEOF
    wait "$pid" || { cat "$D/$name.out" >&2; fail "$name: $* failed"; }
}

# lock_state NAME FILE longest|first|all: that state of FILE in
# locks_during NAME's output ("all": every state that lasted, "/" between).
lock_state() {
    awk -v f="$2" -v w="$3" \
        '$1 == f { print (w == "longest" ? $2 : w == "first" ? $3 : $4) }' "$D/$1.locks"
}

# compare_job [-U]: one job, both tools, with that option.
compare_job() {
    local -a opt=("$@")
    local u=${1:-} q s
    qemu-img create -q -f qcow2 "$D/dst.qcow2" 8M
    locks_during qemu strace -f -o /dev/null -e trace=ftruncate,pwrite64,pwritev,pwritev2 \
        -e inject=ftruncate:delay_enter=1500ms \
        -e inject=pwrite64,pwritev,pwritev2:delay_enter=300ms \
        qemu-img convert "${opt[@]}" -O qcow2 -B base.qcow2 -F qcow2 "$D/src.qcow2" "$D/dst.qcow2"
    qemu-img create -q -f qcow2 "$D/dst.qcow2" 8M
    # (LeakSanitizer cannot stop the world under ptrace: it fails the exit
    # of an ASan build at random; the leak checks run in the other tests.)
    ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 \
    locks_during qublk strace -f -o /dev/null -e trace=ftruncate,io_uring_enter \
        -e inject=ftruncate:delay_enter=1500ms \
        -e inject=io_uring_enter:delay_enter=100ms \
        "$QUBLK" convert "${opt[@]}" --threads 1 -O qcow2 -B base.qcow2 -F qcow2 "$D/src.qcow2" "$D/dst.qcow2"
    qcompare "$D/src.qcow2" "$D/dst.qcow2"
    echo "qemu-img convert $u:"; sed 's/^/  /' "$D/qemu.locks"
    echo "qublk convert $u:"; sed 's/^/  /' "$D/qublk.locks"
    # The source and its backing file (which, with -B, the output's chain
    # opens too, without -U).
    for f in src base; do
        q=$(lock_state qemu $f all) s=$(lock_state qublk $f all)
        [ "$q" != - ] || fail "$u: QEMU held no lock on $f"
        [ "$q" = "$s" ] || fail "$u: $f locked as '$s', QEMU: '$q'"
    done
    # The existing destination while the new image is made (QEMU: the
    # first thing it holds there; qublk: all along, until the rename).
    q=$(lock_state qemu dst first) s=$(lock_state qublk dst longest)
    [ "$q" = "$s" ] || fail "$u: the existing destination locked as '$s', QEMU: '$q'"
    # The image being written.
    q=$(lock_state qemu dst longest) s=$(lock_state qublk tmp longest)
    [ "$q" = "$s" ] || fail "$u: the new image locked as '$s', QEMU: '$q'"
}
compare_job
compare_job -U
echo PASS
