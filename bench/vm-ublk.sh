#!/bin/bash
# SPDX-License-Identifier: MIT
# bench/vm-ublk.sh: ublk benchmarks in the test VM (tests/vm/), side by side
# in one boot: fio with ublksrv's parameters (libaio, direct=1, iodepth=128,
# iodepth_batch_submit=16, iodepth_batch_complete_min=16, numjobs=1;
# randwrite, randread, randrw at 4k; rw at 64k and 512k) on the same 2 GiB
# image through qublk (-q 1 and -q 2), qemu-nbd -c /dev/nbd0 (--cache=none
# --aio=io_uring), the null target (the ceiling) and the raw target on a raw
# image; qcow2 images preallocated (preallocation=falloc) and empty
# (recreated before every run); and the peer, ublksrv at 229e918 (built by
# bench/setup-peer.sh into bench/.cache; its null target, its loop target
# on the raw image, its qcow2 target on the preallocated image, 1 queue,
# the same depth; its columns read n/a when it cannot be built); on the 7.3
# kernel also kublk, the kernel's own selftest server
# (tools/testing/selftests/ublk of Debian's linux-source-7.3, built
# statically by bench/setup-kublk.sh into bench/.cache; its null and loop
# targets, 1 queue, plain, with --auto_zc, the zero copy qublk uses on
# 7.3, and with --auto_zc -b, batched commands as qublk uses them there).
# Within
# a round, each workload runs on every configuration back to back, so that
# the host's load (TCG vCPUs are host threads) hits them alike; ratios are
# per round, then averaged.  Not part of `make check`: numbers, not
# pass/fail; it fails only if a run errs or an image is damaged.  The
# guest half is bench/vm-ublk.guest.sh.
#
#   bench/vm-ublk.sh [--kernel 6.12|7.3] [--runtime S] [--ramp S]
#                    [--rounds N] [--size SIZE] [--mem SIZE]
#                    [--cache none|writeback] [--qdepth N] [--only REGEX]
#                    [--fs tmpfs|ext4]
#                    [--workloads 'RW/BS ...'] [--qublk BIN] [--ab BIN]
#                    [--log FILE] [--out FILE] [--parse LOG]
#
# Prints markdown: the throughput table (IOPS for 4k, MiB/s for 64k/512k;
# read+write), the ratios qublk/qemu-nbd and qcow2/raw per row, the same
# against ublksrv (qublk null/ublksrv null, qublk raw/ublksrv loop, qublk
# q1 and q2/ublksrv qcow2) and against kublk (qublk null/kublk null and
# raw/kublk loop, each against kublk plain, --auto_zc and --auto_zc -b),
# and a CPU table
# (percent of one vCPU sampled mid-run: the server daemon, its io-wq
# workers, fio, the whole machine; server CPU per I/O).
#   --kernel      the guest kernel (tests/vm/run.sh; default
#                 $QUBLK_VM_KERNEL or 6.12)
#   --only        a regex on KIND/CONFIG (none/null none/ublksrv
#                 none/kublk none/kublk-zc none/kublk-zcb raw/raw
#                 raw/ublksrv raw/kublk raw/kublk-zc raw/kublk-zcb
#                 prealloc/qublk-q1 prealloc/ublksrv ...
#                 empty/qemu-nbd)
#   --fs          where the images live in the guest: tmpfs (default), or
#                 ext4 on a brd ram disk (8 GiB guest by default), where
#                 O_DIRECT reads and overwrites are issued inline as on a
#                 disk (tmpfs sends every one through an io-wq thread)
#   --prealloc    how the preallocated images (raw, prealloc) are made on
#                 tmpfs: falloc (default: pages allocated, never written)
#                 or full (every page written, as an image in use has
#                 them; ext4 always gets full)
#   --workloads   the workloads (default: randwrite/4k randread/4k
#                 randrw/4k rw/64k rw/512k; RW/BS/jN runs N fio jobs)
#   --qublk BIN   benchmark BIN instead of building build/qublk
#   --ab BIN      an A/B run: BIN (another qublk build, or a script that
#                 execs one with other settings: A is /usr/local/bin/qublk
#                 in the guest, e.g. 'QUBLK_USER_COPY=1 exec
#                 /usr/local/bin/qublk "$@"') runs as the B
#                 configurations (null-b, null-b-q2, raw-b, qublk-b-q1, qublk-b-q2),
#                 each right after its A; a table gives B/A per row
#   --events      also count kernel events per I/O (context switches,
#                 wakeups, IPIs, system calls, SQEs, io-wq punts, page
#                 faults: tracepoints, exact under TCG) with the
#                 host's perf (apt-get install linux-perf) over each CPU
#                 window; a table gives them per request
#   --out FILE    also write the tables to FILE; --log FILE keeps the
#                 console log; --parse LOG re-renders the tables from a
#                 kept log without booting
#
# The VM runs under TCG: absolute numbers mean little; compare ratios.
# Needs tests/vm/setup.sh done; the guest gets the host's qemu-nbd (and its
# libraries) as an extra file.  Defaults: 2 rounds of 65 runs (95 on 7.3,
# with kublk), 3 s each after a 1 s ramp, 6 GiB guest (three images in
# tmpfs at once): about 18 minutes of wall time on an idle host, 30 at a
# load of 10 (a third more on 7.3).
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
cd "$TOP"

RUNTIME=3 RAMP=1 ROUNDS=2 SIZE=2G MEM='' FS=tmpfs PREALLOC=falloc CACHE=none QDEPTH=128 ONLY=. LOG='' OUT='' PARSE=''
WORKLOADS='randwrite/4k randread/4k randrw/4k rw/64k rw/512k'
KERNEL=${QUBLK_VM_KERNEL:-6.12}
AB='' QBIN='' EVENTS=0
while [ $# -gt 0 ]; do
    case $1 in
        --kernel) KERNEL=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --ramp) RAMP=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --fs) FS=$2; shift 2 ;;
        --prealloc) PREALLOC=$2; shift 2 ;;
        --qdepth) QDEPTH=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --workloads) WORKLOADS=$2; shift 2 ;;
        --ab) AB=$2; shift 2 ;;
        --events) EVENTS=1; shift ;;
        --qublk) QBIN=$2; shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --parse) PARSE=$2; shift 2 ;;
        -h|--help) sed -n "2,60p" "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm-ublk.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

case $PREALLOC in
    falloc|full) ;;
    *) echo "vm-ublk.sh: --prealloc $PREALLOC: falloc or full" >&2; exit 2 ;;
esac
case $FS in
    tmpfs) : "${MEM:=6G}" ;;
    ext4) : "${MEM:=8G}" ;;
    *) echo "vm-ublk.sh: --fs $FS: tmpfs or ext4" >&2; exit 2 ;;
esac

# render LOG: the markdown tables from the guest's BENCH lines.
render() {
    awk '
    function kv(s,   i, n, a, p) {
        delete F
        n = split(s, a, " ")
        for (i = 2; i <= n; i++) { p = index(a[i], "="); if (p) F[substr(a[i], 1, p - 1)] = substr(a[i], p + 1) }
    }
    # the row metric: IOPS for 4k, MiB/s otherwise (read + write)
    function metric(wl) {
        return wl ~ /\/4k(\/|$)/ ? F["riops"] + F["wiops"] : (F["rbw"] + F["wbw"]) / 1024
    }
    # mean over the rounds, or "na"/"err"/"" (missing)
    function val(k) {
        if (k in BAD) return BAD[k]
        return (k in CNT) ? SUM[k] / CNT[k] : ""
    }
    function fmt(wl, v) {
        if (v == "") return "-"
        if (v == "na") return "n/a"
        if (v == "err") return "ERR"
        return wl ~ /\/4k(\/|$)/ ? sprintf("%d", v + 0.5) : sprintf("%.1f", v)
    }
    # mean of the per-round ratios a/b, with their range when rounds > 1
    function ratio(ka, kb,   r, n, sum, lo, hi, x) {
        if ((ka in BAD) || (kb in BAD) || !(ka in CNT) || !(kb in CNT)) return "-"
        n = 0; sum = 0
        for (r = 1; r <= maxround; r++) {
            if (!((ka, r) in M) || !((kb, r) in M) || M[kb, r] == 0) continue
            x = M[ka, r] / M[kb, r]
            if (n == 0 || x < lo) lo = x
            if (n == 0 || x > hi) hi = x
            sum += x; n++
        }
        if (n == 0) return "-"
        if (n == 1) return sprintf("%.2fx", sum)
        return sprintf("%.2fx (%.2f-%.2f)", sum / n, lo, hi)
    }
    # A table with one row per workload: @keys names KIND/CONFIG runs
    # (space-separated), @cols lays out the columns after the workload:
    # vN the value of key N, rN/M the ratio of key N to key M.  Rows
    # where none of the keys numbered in @need has a value are left out.
    # @lead, if not empty, fills a first column (the image) on every row.
    function wltable(head, lead, keys, cols, need,   nk, nc, nn, kk, c, a, p, q, w, wl, i, row, sep, any) {
        print ""
        print head
        nc = split(cols, c, " ")
        sep = lead == "" ? "|---|" : "|---|---|"
        for (i = 1; i <= nc; i++) sep = sep "---:|"
        print sep
        nk = split(keys, a, " ")
        nn = split(need, q, " ")
        for (w = 1; w <= nwl; w++) {
            wl = wls[w]
            for (i = 1; i <= nk; i++) { kk[i] = a[i] SUBSEP wl; sub("/", SUBSEP, kk[i]) }
            any = 0
            for (i = 1; i <= nn; i++) if (val(kk[q[i]]) != "") any = 1
            if (!any) continue
            row = (lead == "" ? "" : "| " lead " ") "| " wl " |"
            for (i = 1; i <= nc; i++) {
                if (c[i] ~ /^v/) row = row " " fmt(wl, val(kk[substr(c[i], 2)])) " |"
                else { split(substr(c[i], 2), p, "/"); row = row " " ratio(kk[p[1]], kk[p[2]]) " |" }
            }
            print row
        }
    }
    # whether a configuration matching the regex ran (and, with @bad, failed)
    function ran(re, bad,   k) {
        for (k in CNT) if (k ~ re) return 1
        if (bad) for (k in BAD) if (k ~ re) return 1
        return 0
    }
    /^BENCH-CONF / { conf = substr($0, 12) }
    /^BENCH / {
        kv($0)
        r = F["round"] == "" ? 1 : F["round"]
        if (r > maxround) maxround = r
        k = F["img"] SUBSEP F["cfg"] SUBSEP F["wl"]
        if (!(F["wl"] in seenwl)) { seenwl[F["wl"]] = 1; wls[++nwl] = F["wl"] }
        if (F["st"] == "na") { BAD[k] = "na"; next }
        if (F["st"] != "ok") { BAD[k] = "err"; nerr++; next }
        m = metric(F["wl"])
        M[k, r] = m; SUM[k] += m; CNT[k]++
        IOPS[k] += F["riops"] + F["wiops"]
        SRV[k] += F["srv"]; WQ[k] += F["iowq"]; FIO[k] += F["fio"]; TOT[k] += F["tot"]
        # --events: counts over the window; requests in it from the fio rate
        if (F["evsecs"] != "") {
            EVIO[k] += (F["riops"] + F["wiops"]) * F["evsecs"]
            for (f in F) if (f ~ /^ev_/) EV[k, substr(f, 4)] += F[f]
            # the columns in the order the guest counts them
            for (i = 2; i <= NF; i++) if ($i ~ /^ev_/) {
                e = substr($i, 4, index($i, "=") - 4)
                if (!(e in seenev)) { seenev[e] = 1; evs[++nev] = e }
            }
        }
        if (F["usr"] != "") USR[k] += F["usr"]
        if (!(k in seenk)) { seenk[k] = 1; cpuk[++ncpu] = k }
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
                kn = "none" SUBSEP "null" SUBSEP wl; kr = "raw" SUBSEP "raw" SUBSEP wl
                k1 = img SUBSEP "qublk-q1" SUBSEP wl; k2 = img SUBSEP "qublk-q2" SUBSEP wl
                kb = img SUBSEP "qemu-nbd" SUBSEP wl
                if (val(k1) == "" && val(k2) == "" && val(kb) == "") continue
                printf "| qcow2 %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
                    img, wl, fmt(wl, val(kn)), fmt(wl, val(kr)), fmt(wl, val(k1)), fmt(wl, val(k2)),
                    fmt(wl, val(kb)), ratio(k1, kb), ratio(k2, kb), ratio(k1, kr), ratio(k2, kr)
            }
        }
        wltable("| image | workload | ublksrv null | ublksrv loop | ublksrv qcow2 | null/ublksrv null | raw/ublksrv loop | q1/ublksrv | q2/ublksrv |",
                "qcow2 prealloc",
                "none/null raw/raw prealloc/qublk-q1 prealloc/qublk-q2 none/ublksrv raw/ublksrv prealloc/ublksrv",
                "v5 v6 v7 r1/5 r2/6 r3/7 r4/7", "5 6 7")
        # kublk (the 7.3 kernel only): null and loop, plain and --auto_zc.
        if (ran("kublk", 1))
            wltable("| workload | kublk null | kublk-zc null | kublk loop | kublk-zc loop | null/kublk null | null/kublk-zc null | raw/kublk loop | raw/kublk-zc loop |",
                    "", "none/null raw/raw none/kublk none/kublk-zc raw/kublk raw/kublk-zc",
                    "v3 v4 v5 v6 r1/3 r1/4 r2/5 r2/6", "3 4 5 6")
        # kublk with batched commands (--auto_zc -b), as qublk uses them on 7.3.
        if (ran("kublk-zcb", 1))
            wltable("| workload | kublk-zcb null | kublk-zcb loop | null/kublk-zcb null | raw/kublk-zcb loop |",
                    "", "none/null raw/raw none/kublk-zcb raw/kublk-zcb",
                    "v3 v4 r1/3 r2/4", "3 4")
        # Queues (null-q2 runs): two queues against one, null and qcow2.
        if (ran("null-q2", 0))
            wltable("| workload | null q1 | null q2 | null q2/q1 | qcow2 q1 | qcow2 q2 | qcow2 q2/q1 |", "",
                    "none/null none/null-q2 prealloc/qublk-q1 prealloc/qublk-q2",
                    "v1 v2 r2/1 v3 v4 r4/3", "2")
        # Allocation (sparse/raw runs): what allocating in the file system
        # costs a raw file, next to what an empty qcow2 pays.
        if (ran("^sparse", 0))
            wltable("| workload | raw | raw sparse | qcow2 prealloc q1 | qcow2 empty q1 | sparse/raw | empty/prealloc | empty/sparse |", "",
                    "raw/raw sparse/raw prealloc/qublk-q1 empty/qublk-q1",
                    "v1 v2 v3 v4 r2/1 r4/3 r4/2", "2")
        # A/B (--ab): B/A per row, when there are B runs.
        if (ran("(null-b|raw-b|qublk-b-q[0-9])", 0)) {
            print ""
            print "| image | workload | null B/A | null q2 B/A | raw B/A | q1 B/A | q2 B/A |"
            print "|---|---|---:|---:|---:|---:|---:|"
            for (ii = 1; ii <= 2; ii++) {
                img = imgs[ii]
                for (w = 1; w <= nwl; w++) {
                    wl = wls[w]
                    kn = "none" SUBSEP "null" SUBSEP wl; kr = "raw" SUBSEP "raw" SUBSEP wl
                    k1 = img SUBSEP "qublk-q1" SUBSEP wl; k2 = img SUBSEP "qublk-q2" SUBSEP wl
                    bn = "none" SUBSEP "null-b" SUBSEP wl; br = "raw" SUBSEP "raw-b" SUBSEP wl
                    kn2 = "none" SUBSEP "null-q2" SUBSEP wl; bn2 = "none" SUBSEP "null-b-q2" SUBSEP wl
                    b1 = img SUBSEP "qublk-b-q1" SUBSEP wl; b2 = img SUBSEP "qublk-b-q2" SUBSEP wl
                    if (val(b1) == "" && val(b2) == "" && (ii > 1 || (val(bn) == "" && val(bn2) == "" && val(br) == ""))) continue
                    # null and raw do not depend on the image kind: once.
                    if (ii > 1) { rn = "-"; rn2 = "-"; rr = "-" } else { rn = ratio(bn, kn); rn2 = ratio(bn2, kn2); rr = ratio(br, kr) }
                    printf "| qcow2 %s | %s | %s | %s | %s | %s | %s |\n", img, wl, rn, rn2, rr, ratio(b1, k1), ratio(b2, k2)
                }
            }
        }
        print ""
        printf "4k rows: IOPS (read+write); 64k/512k rows: MiB/s (read+write); /jN: N fio jobs; the mean of %d round(s). Ratios: the mean of the per-round ratios, (min-max) over the rounds. null and raw do not depend on the qcow2 image kind (raw: a preallocated raw file of the same size; raw sparse: a raw file created empty before each run, so that its writes allocate in the file system as an empty qcow2\x27s do). ublksrv (229e918, 1 queue): its null target, its loop target on the raw file, its qcow2 target on the preallocated qcow2 (it cannot run on an empty image on tmpfs). kublk (the kernel\x27s selftest server, 7.3 only, 1 queue): its null target and its loop target (O_DIRECT) on the raw file, plain (the driver copies the data to and from the server\x27s buffers), -zc (--auto_zc: the driver registers the request\x27s pages as an io_uring buffer, as qublk does on 7.3; its null target then issues one io_uring NOP on it per request) and -zcb (--auto_zc -b: with batched commands, UBLK_F_BATCH_IO, as qublk\x27s on 7.3).\n", maxround
        print ""
        print "| image | config | workload | IOPS | server CPU % | of which io-wq % | fio CPU % | machine CPU % | server CPU us/IO | of which user us/IO |"
        print "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
        for (i = 1; i <= ncpu; i++) {
            k = cpuk[i]; split(k, p, SUBSEP)
            if (k in BAD) continue
            n = CNT[k]
            us = IOPS[k] > 0 ? sprintf("%.1f", SRV[k] / 100 * 1e6 / IOPS[k]) : "-"
            # (older logs have no usr field)
            uu = IOPS[k] > 0 && (k in USR) ? sprintf("%.1f", USR[k] / 100 * 1e6 / IOPS[k]) : "-"
            printf "| %s | %s | %s | %d | %.0f | %.0f | %.0f | %.0f | %s | %s |\n", p[1], p[2], p[3],
                IOPS[k] / n, SRV[k] / n, WQ[k] / n, FIO[k] / n, TOT[k] / n, us, uu
        }
        print ""
        print "CPU (means over the rounds): percent of one vCPU over a window in the middle of each run: utime+stime from /proc/PID/task/*/stat of the server\x27s threads (of which io-wq: its io_uring worker threads iou-wrk-*, where io_uring punts I/O the file cannot take without blocking; a worker that exits inside the window is lost; user: the utime of its other threads, the server\x27s own code) and of fio; the machine: /proc/stat non-idle ticks, max 100 x vCPUs (tick-sampled, so it can read below the per-thread sums). For ublk the driver work done in the daemon\x27s io_uring context counts as the daemon\x27s; for nbd the kernel\x27s socket receive work runs in kworkers (machine minus server minus fio)."
        # --events: per request, machine-wide (fio and kernel threads too).
        if (nev) {
            print ""
            printf "| image | config | workload |"
            for (j = 1; j <= nev; j++) printf " %s |", evs[j]
            printf "\n|---|---|---|"
            for (j = 1; j <= nev; j++) printf "---:|"
            print ""
            for (i = 1; i <= ncpu; i++) {
                k = cpuk[i]; split(k, p, SUBSEP)
                if ((k in BAD) || !(EVIO[k] > 0)) continue
                printf "| %s | %s | %s |", p[1], p[2], p[3]
                for (j = 1; j <= nev; j++)
                    printf " %s |", ((k, evs[j]) in EV) ? sprintf("%.2f", EV[k, evs[j]] / EVIO[k]) : "-"
                print ""
            }
            print ""
            print "Events per request (--events): kernel tracepoints counted machine-wide by perf stat -a over the CPU window, divided by fio\x27s mean rate times the window: csw sched_switch, wake sched_wakeup, ipi_resched / ipi_call the rescheduling and function-call IPIs received, enter io_uring_enter calls, sys all system calls (fio\x27s too), sqe io_uring_submit_req, iowq io_uring_queue_async_work (punts to an io-wq worker), fault user page faults.  Exact counts, unlike TCG\x27s timing; perf\x27s own work is in them (small)."
        }
        if (nerr) printf "\n%d runs failed (ERR): see the console log.\n", nerr
    }' "$1"
}

if [ -n "$PARSE" ]; then
    render "$PARSE"
    exit 0
fi

if [ -n "$QBIN" ]; then
    [ -x "$QBIN" ] || { echo "vm-ublk.sh: --qublk $QBIN: not an executable" >&2; exit 2; }
    QUBLK_ID="$QBIN of $(date -r "$QBIN" '+%Y-%m-%d %H:%M') (--qublk)"
else
    # Measure the current sources: make is incremental.  If the tree does
    # not build right now (others at work), an existing binary is used,
    # with a note.
    QBIN=build/qublk
    if ! make -j2 build/qublk >&2; then
        [ -x build/qublk ] || { echo "vm-ublk.sh: build/qublk does not build" >&2; exit 1; }
        echo "vm-ublk.sh: warning: make failed; benchmarking the existing build/qublk" >&2
    fi
    rev=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
    git diff --quiet HEAD -- src 2>/dev/null || rev+=" + uncommitted changes in src/"
    QUBLK_ID="build/qublk of $(date -r build/qublk '+%Y-%m-%d %H:%M'), tree at $rev"
fi
NBD=$(command -v qemu-nbd) || { echo "vm-ublk.sh: qemu-nbd not installed on the host (apt-get install qemu-utils)" >&2; exit 1; }
# The peer: its columns read n/a if it cannot be built here.
PEER=()
if peer=$(bench/setup-peer.sh); then
    PEER=("$peer")
else
    echo "vm-ublk.sh: warning: no ublksrv (bench/setup-peer.sh failed): its columns will read n/a" >&2
fi
# The second peer, kublk: the selftest server of the 7.3 kernel, run on
# that kernel only (its features follow the driver it was written for).
KUBLK=0 KUBLK_ID=''
if [ "$KERNEL" = 7.3 ]; then
    KUBLK=1
    if kublk=$(bench/setup-kublk.sh); then
        PEER+=("$kublk")
        KUBLK_ID=$(cat "$kublk.version" 2>/dev/null || echo "$kublk")
    else
        echo "vm-ublk.sh: warning: no kublk (bench/setup-kublk.sh failed): its columns will read n/a" >&2
    fi
fi

KEEP=1
if [ -z "$LOG" ]; then
    LOG=$(mktemp /tmp/qublk-vm-bench.XXXXXX.log)
    KEEP=0
fi
# B: named qublk-b in the guest (run.sh copies files under their names).
EXTRA=(bench/vm-lib.guest.sh "${PEER[@]}")
if [ -n "$AB" ]; then
    [ -x "$AB" ] || { echo "vm-ublk.sh: --ab $AB: not an executable" >&2; exit 2; }
    ABDIR=$(mktemp -d /tmp/qublk-vm-ab.XXXXXX)
    cp "$AB" "$ABDIR/qublk-b"
    EXTRA+=("$ABDIR/qublk-b")
    QUBLK_ID+="; B (--ab): $AB of $(date -r "$AB" '+%Y-%m-%d %H:%M')"
fi
if [ "$EVENTS" = 1 ]; then
    PERF=$(command -v perf) ||
        { echo "vm-ublk.sh: --events needs perf on the host (apt-get install linux-perf)" >&2; exit 1; }
    EXTRA+=("$PERF")
fi
# Per run: ~RUNTIME+RAMP+2 s (more on a loaded host: a margin); per
# workload 13 configurations (21 with --ab, 6 more with kublk), plus
# image creation and boot.
nwl=0
for _ in $WORKLOADS; do nwl=$((nwl + 1)); done
NCONF=13
[ -z "$AB" ] || NCONF=21
[ "$KUBLK" = 0 ] || NCONF=$((NCONF + 6))
NRUNS=$((NCONF * nwl))
TIMEOUT=$(( (RUNTIME + RAMP + 10) * NRUNS * ROUNDS + 600 ))
rc=0
load0=$(cut -d' ' -f1-3 /proc/loadavg)
tests/vm/run.sh --kernel "$KERNEL" --qublk "$QBIN" --mem "$MEM" --timeout "$TIMEOUT" --log "$LOG" --quiet \
    --env BENCH_SIZE="$SIZE" --env BENCH_RUNTIME="$RUNTIME" --env BENCH_RAMP="$RAMP" --env BENCH_ROUNDS="$ROUNDS" \
    --env BENCH_CACHE="$CACHE" --env BENCH_QDEPTH="$QDEPTH" --env BENCH_ONLY="$ONLY" --env BENCH_WORKLOADS="$WORKLOADS" \
    --env BENCH_KUBLK="$KUBLK" --env BENCH_FS="$FS" --env BENCH_PREALLOC="$PREALLOC" --env BENCH_EVENTS="$EVENTS" \
    bench/vm-ublk.guest.sh "$NBD" "${EXTRA[@]}" >&2 || rc=$?
[ -z "$AB" ] || rm -rf "$ABDIR"
load1=$(cut -d' ' -f1-3 /proc/loadavg)
[ "$rc" = 77 ] && { echo "vm-ublk.sh: no VM here (run tests/vm/setup.sh)" >&2; exit 77; }

only_arg=''
[ "$ONLY" = . ] || only_arg=" --only '$ONLY'"
[ "$WORKLOADS" = 'randwrite/4k randread/4k randrw/4k rw/64k rw/512k' ] || only_arg+=" --workloads '$WORKLOADS'"
[ "$QBIN" = build/qublk ] || only_arg+=" --qublk $QBIN"
[ -z "$AB" ] || only_arg+=" --ab $AB"
[ "$EVENTS" = 0 ] || only_arg+=" --events"
[ "$PREALLOC" = falloc ] || only_arg+=" --prealloc $PREALLOC"
{
    echo "Command: bench/vm-ublk.sh --kernel $KERNEL --runtime $RUNTIME --ramp $RAMP --rounds $ROUNDS --size $SIZE --mem $MEM --cache $CACHE --fs $FS --qdepth $QDEPTH$only_arg"
    echo
    # TCG vCPUs are host threads: other work on the host shows in the numbers.
    echo "Binary: $QUBLK_ID."
    echo
    [ -z "$KUBLK_ID" ] || { echo "Peer: $KUBLK_ID."; echo; }
    echo "Host: $(nproc) CPUs, load average before $load0, after $load1 (the VM itself adds ~2)."
    echo
    render "$LOG"
} | if [ -n "$OUT" ]; then tee "$OUT"; else cat; fi

if [ "$rc" != 0 ]; then
    echo "vm-ublk.sh: the VM run failed (exit $rc); console log: $LOG" >&2
    exit 1
fi
[ "$KEEP" = 1 ] || rm -f "$LOG"
