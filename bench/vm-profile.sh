#!/bin/bash
# SPDX-License-Identifier: MIT
# bench/vm-profile.sh: where a ublk configuration's time goes, in the test
# VM (TCG): fio with bench/vm-ublk.sh's parameters against qublk or a
# peer, and the host's perf (linux-perf, whose binary and libraries go into
# the guest) recording the whole guest with call graphs; prints each kind
# of thread's share and the top symbols per configuration (command and
# symbol, self time) and fio's IOPS.  For reading, not pass/fail; not part
# of `make check`.
#
#   bench/vm-profile.sh [--kernel 6.12|7.3] [--configs 'prealloc empty']
#                       [--fs tmpfs|ext4] [--workload randwrite/4k]
#                       [--secs S] [--top N]
#                       [--add-args 'ARGS'] [--qublk BIN] [--log FILE]
#
#   --configs   null, raw, sparse (raw preallocated or created empty),
#               prealloc, empty (qcow2 preallocated or empty);
#               the peers: ublksrv-null, ublksrv-loop, ublksrv-qcow2
#               (bench/setup-peer.sh), kublk-loop, kublk-zc-loop,
#               kublk-zcb-loop (--auto_zc -b; 7.3 only,
#               bench/setup-kublk.sh)
#   --fs        where the images live: tmpfs, or ext4 on a brd ram disk
#               (8 GiB guest; as bench/vm-ublk.sh --fs)
#   --add-args  extra `qublk add` arguments (e.g. --no-zero-copy)
# Needs tests/vm/setup.sh done and `perf` on the host (apt-get install
# linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."

KERNEL=${QUBLK_VM_KERNEL:-6.12} CONFIGS="prealloc empty" WL=randwrite/4k SECS=4 TOP=60
ADD_ARGS="" QBIN=build/qublk LOG="" FS=tmpfs
usage() { sed -n '3,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case $1 in
        --kernel) KERNEL=$2; shift ;;
        --configs) CONFIGS=$2; shift ;;
        --workload) WL=$2; shift ;;
        --fs) FS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --top) TOP=$2; shift ;;
        --add-args) ADD_ARGS=$2; shift ;;
        --qublk) QBIN=$2; shift ;;
        --log) LOG=$2; shift ;;
        -h|--help) usage 0 ;;
        *) echo "vm-profile.sh: unknown argument '$1'" >&2; usage 2 >&2 ;;
    esac
    shift
done
case $FS in
    tmpfs) MEM=6G ;;
    ext4) MEM=8G ;;
    *) echo "vm-profile.sh: --fs tmpfs or ext4" >&2; exit 2 ;;
esac
[ "$QBIN" != build/qublk ] || make -j2 build/qublk >&2
PERF=$(command -v perf) ||
    { echo "vm-profile.sh: no perf binary (apt-get install linux-perf)" >&2; exit 1; }
[ -n "$LOG" ] || LOG=$(mktemp /tmp/qublk-vm-profile.XXXXXX.log)
n=0 EXTRA=(bench/vm-lib.guest.sh)
for c in $CONFIGS; do
    n=$((n + 1))
    case $c in
        ublksrv-*) peer=$(bench/setup-peer.sh) || exit 1 ;;
        kublk-*) peer=$(bench/setup-kublk.sh) || exit 1 ;;
        *) continue ;;
    esac
    case " ${EXTRA[*]} " in *" $peer "*) ;; *) EXTRA+=("$peer") ;; esac
done
rc=0
tests/vm/run.sh --kernel "$KERNEL" --qublk "$QBIN" --mem "$MEM" --quiet --log "$LOG" \
    --timeout $(( (SECS + 40) * n + 300 )) \
    --env "PROF_CONFIGS=$CONFIGS" --env "PROF_WORKLOAD=$WL" --env "PROF_SECS=$SECS" \
    --env "PROF_TOP=$TOP" --env "PROF_ADD_ARGS=$ADD_ARGS" --env "PROF_FS=$FS" \
    bench/vm-profile.guest.sh "$PERF" "${EXTRA[@]}" >&2 || rc=$?
# shellcheck disable=SC2016  # the quotes are part of the text
echo "Command: bench/vm-profile.sh --kernel $KERNEL --configs '$CONFIGS' --fs $FS --workload $WL --secs $SECS${ADD_ARGS:+ --add-args '$ADD_ARGS'}"
echo
tr -d '\r' <"$LOG" | awk '/^PROFILE-IOPS /{ print; next }
    /^PROFILE-BEGIN /{ print ""; print "== " $2; on = 1; next }
    /^PROFILE-END/{ on = 0; next }
    on { print }'
exit "$rc"
