# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# bench/vm-profile.guest.sh: the guest half of bench/vm-profile.sh.  For
# each configuration in $PROF_CONFIGS (null, raw, sparse, prealloc, empty:
# qublk's null target, its raw target on a preallocated or an empty raw
# file, qcow2 preallocated or empty; and the peers, when the host passed
# their binaries: ublksrv-null, ublksrv-loop, ublksrv-qcow2, kublk-loop,
# kublk-zc-loop, kublk-zcb-loop (--auto_zc -b), on the same images) in
# $PROF_FS (tmpfs or ext4 on a ram disk, bench/vm-lib.guest.sh), runs
# fio with bench/vm-ublk.sh's parameters ($PROF_WORKLOAD, e.g.
# randwrite/4k) against `qublk add
# $PROF_ADD_ARGS` (or the peer), and records the whole machine with `perf
# record -a -g` for $PROF_SECS s in the middle of the run.  Prints
# "PROFILE-BEGIN CFG" ... "PROFILE-END" around the report (`perf report
# --no-children`: first each kind of thread's share of the samples, then
# by command and symbol, top $PROF_TOP lines) and fio's IOPS on a
# "PROFILE-IOPS" line.  PROF_PERF=0: fio alone (what the recording costs:
# under TCG, sampling at $PROF_FREQ Hz, default 997, halves the IOPS, and
# samples land on the instructions where interrupts are let in, such as
# spin_unlock_irqrestore).
B=/bench
PATH=$VMTEST_DIR:$PATH
SIZE=${PROF_SIZE:-2G}
QDEPTH=128
FS=${PROF_FS:-tmpfs}
SECS=${PROF_SECS:-4}
TOP=${PROF_TOP:-60}
read -r -a CONFIGS <<<"${PROF_CONFIGS:-prealloc empty}"
WL=${PROF_WORKLOAD:-randwrite/4k}
# shellcheck disable=SC2206  # split on purpose
ADD_ARGS=(${PROF_ADD_ARGS:-})
PERF=$(command -v perf) || { echo "no perf in the guest" >&2; exit 1; }
# shellcheck disable=SC2034
VMTEST_XTRACE=0

# shellcheck source=bench/vm-lib.guest.sh
. "$VMTEST_DIR/vm-lib.guest.sh"

bench_mount
echo -1 >/proc/sys/kernel/perf_event_paranoid
echo 0 >/proc/sys/kernel/kptr_restrict

profile() { # CFG
    local cfg=$1 dev img rw=${WL%/*} bs=${WL#*/} run=$((SECS + 4))
    case $cfg in
        null|ublksrv-null) ;;
        raw|ublksrv-loop|kublk-loop|kublk-zc-loop|kublk-zcb-loop) img=$B/img.raw; mk_image raw "$img" ;;
        sparse) img=$B/img.raw; mk_image sparse "$img" ;;
        prealloc|ublksrv-qcow2) img=$B/img.qcow2; mk_image prealloc "$img" ;;
        empty) img=$B/img.qcow2; mk_image empty "$img" ;;
        *) fail "unknown configuration $cfg" ;;
    esac
    case $cfg in
        null) dev=$(qublk add -t null --size "$SIZE" -d "$QDEPTH" "${ADD_ARGS[@]}") ;;
        raw|sparse) dev=$(qublk add -t raw -d "$QDEPTH" "${ADD_ARGS[@]}" "$img") ;;
        prealloc|empty) dev=$(qublk add -t qcow2 -d "$QDEPTH" "${ADD_ARGS[@]}" "$img") ;;
        ublksrv-null) dev=$(start_ublksrv null) ;;
        ublksrv-*) dev=$(start_ublksrv "${cfg#ublksrv-}" "$img") ;;
        kublk-loop) dev=$(start_kublk loop "$img") ;;
        kublk-zc-loop) dev=$(start_kublk loop --auto_zc "$img") ;;
        kublk-zcb-loop) dev=$(start_kublk loop --auto_zc -b "$img") ;;
    esac
    [ -b "$dev" ] || fail "could not start $cfg"
    fio --name=p --filename="$dev" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" \
        --iodepth=128 --iodepth_batch_submit=16 --iodepth_batch_complete_min=16 \
        --numjobs=1 --time_based --runtime="$run" --output-format=terse --terse-version=3 \
        >"$B/fio.out" 2>&1 &
    local fpid=$!
    sleep 2
    if [ "${PROF_PERF:-1}" = 1 ]; then
        "$PERF" record -q -e cpu-clock -F "${PROF_FREQ:-997}" -a -g -o "$B/perf.data" \
            -- sleep "$SECS" >"$B/perf.err" 2>&1 || { cat "$B/perf.err"; fail "perf record failed"; }
    fi
    wait "$fpid" || { cat "$B/fio.out"; fail "fio failed"; }
    # terse v3: read iops field 8, write iops field 49
    awk -F';' -v c="$cfg" '{ print "PROFILE-IOPS " c " read=" $8 " write=" $49 }' "$B/fio.out"
    case $cfg in
        ublksrv-*) stop_ublksrv ;;
        kublk-*) stop_kublk ;;
        *) qublk del -n "${dev#/dev/ublkb}" ;;
    esac
    [ -e "$B/perf.data" ] || { drop "${img:-/nonexistent}"; return 0; }
    echo "PROFILE-BEGIN $cfg"
    # The share of each kind of thread: io-wq workers (iou-wrk-PID) as one,
    # swapper (idle) left in.
    "$PERF" report -i "$B/perf.data" --no-children --sort comm --stdio -g none \
        2>/dev/null | awk '/^#/ || NF < 2 { next }
            { c = $2; sub(/^iou-wrk-.*/, "iou-wrk", c); p[c] += $1 + 0 }
            END { for (c in p) if (p[c] >= 0.5) printf "  thread %-16s %6.2f%%\n", c, p[c] }' |
        sort -k3 -nr
    "$PERF" report -i "$B/perf.data" --no-children --sort comm,sym --stdio -g none \
        --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n "$TOP"
    echo "PROFILE-END"
    rm -f "$B/perf.data"
    drop "${img:-/nonexistent}"
}

need qublk fio qemu-img
for c in "${CONFIGS[@]}"; do
    vmtest "profile-$c" profile "$c"
done
