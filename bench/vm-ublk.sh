#!/bin/bash
# SPDX-License-Identifier: MIT
# bench/vm-ublk.sh: ublk benchmarks in the test VM (tests/vm/), side by side
# in one boot: fio with ublksrv's parameters (libaio, direct=1, iodepth=128,
# iodepth_batch_submit=16, iodepth_batch_complete_min=16, numjobs=1;
# randwrite, randread, randrw at 4k; rw at 64k and 512k) on the same 2 GiB
# image through qublk (-q 1 and -q 2), qemu-nbd -c /dev/nbd0 (--cache=none
# --aio=io_uring), the null target (the ceiling) and the raw target on a raw
# image; qcow2 images preallocated (preallocation=falloc) and empty
# (recreated before every workload).  Not part of `make check`: numbers, not
# pass/fail; it fails only if a run errs or an image is damaged.
#
#   bench/vm-ublk.sh [--runtime S] [--ramp S] [--size SIZE] [--mem SIZE]
#                    [--cache none|writeback] [--qdepth N] [--only REGEX]
#                    [--log FILE] [--out FILE] [--parse LOG]
#
# Prints markdown: the throughput table (IOPS for 4k, MiB/s for 64k/512k;
# read+write), the ratios qublk/qemu-nbd and qcow2/raw per row, and a CPU
# table (percent of one vCPU sampled mid-run: the server daemon, fio, the
# whole machine; server CPU per I/O).  --parse LOG re-renders the tables
# from a kept console log without booting.
#
# The VM runs under TCG: absolute numbers mean little; compare ratios.
# Needs tests/vm/setup.sh done; the guest gets the host's qemu-nbd (and its
# libraries) as an extra file.  Defaults: 5 s per run after a 1 s ramp,
# ~40 runs: about 8-10 minutes of wall time.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
cd "$TOP"

RUNTIME=5 RAMP=1 SIZE=2G MEM=4G CACHE=none QDEPTH=128 ONLY=. LOG='' OUT='' PARSE=''
while [ $# -gt 0 ]; do
    case $1 in
        --runtime) RUNTIME=$2; shift 2 ;;
        --ramp) RAMP=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --qdepth) QDEPTH=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --parse) PARSE=$2; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm-ublk.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

# render LOG: the markdown tables from the guest's BENCH lines.
render() {
    awk '
    function kv(s,   i, n, a, p) {
        delete F
        n = split(s, a, " ")
        for (i = 2; i <= n; i++) { p = index(a[i], "="); F[substr(a[i], 1, p - 1)] = substr(a[i], p + 1) }
    }
    # the row metric: IOPS for 4k, MiB/s otherwise (read + write)
    function metric(wl, ri, rb, wi, wb) {
        return wl ~ /\/4k$/ ? ri + wi : (rb + wb) / 1024
    }
    function fmt(wl, v) {
        if (v == "") return "-"
        if (v == "na") return "n/a"
        if (v == "err") return "ERR"
        return wl ~ /\/4k$/ ? sprintf("%d", v) : sprintf("%.1f", v)
    }
    function ratio(a, b) {
        if (a == "" || b == "" || a == "na" || b == "na" || a == "err" || b == "err" || b + 0 == 0) return "-"
        return sprintf("%.2fx", a / b)
    }
    /^BENCH-CONF / { conf = substr($0, 12) }
    /^BENCH / {
        kv($0)
        k = F["img"] SUBSEP F["cfg"] SUBSEP F["wl"]
        if (!(F["wl"] in seenwl)) { seenwl[F["wl"]] = 1; wls[++nwl] = F["wl"] }
        if (F["st"] == "na") { V[k] = "na"; next }
        if (F["st"] != "ok") { V[k] = "err"; nerr++; next }
        V[k] = metric(F["wl"], F["riops"], F["rbw"], F["wiops"], F["wbw"])
        IOPS[k] = F["riops"] + F["wiops"]
        SRV[k] = F["srv"]; WQ[k] = F["iowq"]; FIO[k] = F["fio"]; TOT[k] = F["tot"]
        cpuk[++ncpu] = k
    }
    END {
        if (conf != "") printf "Guest: %s\n\n", conf
        print "| image | workload | null | raw | qublk q1 | qublk q2 | qemu-nbd | q1/nbd | q2/nbd | q1/raw | q2/raw |"
        print "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        split("prealloc empty", imgs, " ")
        for (ii = 1; ii <= 2; ii++) {
            img = imgs[ii]
            for (w = 1; w <= nwl; w++) {
                wl = wls[w]
                n = V["none", "null", wl]; r = V["raw", "raw", wl]
                q1 = V[img, "qublk-q1", wl]; q2 = V[img, "qublk-q2", wl]; nb = V[img, "qemu-nbd", wl]
                if (q1 == "" && q2 == "" && nb == "") continue
                printf "| qcow2 %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
                    img, wl, fmt(wl, n), fmt(wl, r), fmt(wl, q1), fmt(wl, q2), fmt(wl, nb),
                    ratio(q1, nb), ratio(q2, nb), ratio(q1, r), ratio(q2, r)
            }
        }
        print ""
        print "4k rows: IOPS (read+write); 64k/512k rows: MiB/s (read+write). null and raw do not depend on the qcow2 image kind (raw: a preallocated raw file of the same size)."
        print ""
        print "| image | config | workload | IOPS | server CPU % | of which io-wq % | fio CPU % | machine CPU % | server CPU us/IO |"
        print "|---|---|---|---:|---:|---:|---:|---:|---:|"
        for (i = 1; i <= ncpu; i++) {
            k = cpuk[i]; split(k, p, SUBSEP)
            us = IOPS[k] > 0 ? sprintf("%.1f", SRV[k] / 100 * 1e6 / IOPS[k]) : "-"
            printf "| %s | %s | %s | %d | %s | %s | %s | %s | %s |\n", p[1], p[2], p[3], IOPS[k], SRV[k], WQ[k], FIO[k], TOT[k], us
        }
        print ""
        print "CPU: percent of one vCPU over a window in the middle of each run (/proc/PID/task/*/stat utime+stime of the server\x27s threads, of which io-wq: its io_uring worker threads iou-wrk-*, where io_uring punts I/O the file cannot take without blocking; of fio; and /proc/stat non-idle for the whole machine, max 100 x vCPUs). For ublk the driver work done in the daemon\x27s io_uring context counts as the daemon\x27s; for nbd the kernel\x27s socket receive work runs in kworkers (machine minus server minus fio)."
        if (nerr) printf "\n%d runs failed (ERR): see the console log.\n", nerr
    }' "$1"
}

if [ -n "$PARSE" ]; then
    render "$PARSE"
    exit 0
fi

[ -x build/qublk ] || make -j2 build/qublk >&2
NBD=$(command -v qemu-nbd) || { echo "vm-ublk.sh: qemu-nbd not installed on the host (apt-get install qemu-utils)" >&2; exit 1; }

KEEP=1
if [ -z "$LOG" ]; then
    LOG=$(mktemp /tmp/qublk-vm-bench.XXXXXX.log)
    KEEP=0
fi
# Per run: ~RUNTIME+RAMP+2 s, 40 runs, plus image creation and boot.
TIMEOUT=$(( (RUNTIME + RAMP + 4) * 40 + 300 ))
rc=0
tests/vm/run.sh --qublk build/qublk --mem "$MEM" --timeout "$TIMEOUT" --log "$LOG" --quiet \
    --env BENCH_SIZE="$SIZE" --env BENCH_RUNTIME="$RUNTIME" --env BENCH_RAMP="$RAMP" \
    --env BENCH_CACHE="$CACHE" --env BENCH_QDEPTH="$QDEPTH" --env BENCH_ONLY="$ONLY" \
    bench/vm-ublk.guest.sh "$NBD" >&2 || rc=$?
[ "$rc" = 77 ] && { echo "vm-ublk.sh: no VM here (run tests/vm/setup.sh)" >&2; exit 77; }

{
    echo "Command: bench/vm-ublk.sh --runtime $RUNTIME --ramp $RAMP --size $SIZE --mem $MEM --cache $CACHE --qdepth $QDEPTH${ONLY:+ --only '$ONLY'}"
    echo
    render "$LOG"
} | if [ -n "$OUT" ]; then tee "$OUT"; else cat; fi

if [ "$rc" != 0 ]; then
    echo "vm-ublk.sh: the VM run failed (exit $rc); console log: $LOG" >&2
    exit 1
fi
[ "$KEEP" = 1 ] || rm -f "$LOG"
