# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# bench/vm-ublk.guest.sh: the guest half of bench/vm-ublk.sh (sourced by the
# VM harness, tests/vm/guest-lib.sh).  Runs fio with ublksrv's parameters
# (libaio, direct=1, iodepth=128, batch submit/complete 16, numjobs=1) on the
# same 2 GiB images through qublk (1 and 2 queues), qemu-nbd -c /dev/nbd0,
# the null target and the raw target, and the peers: ublksrv (its null, loop
# and qcow2 targets, 1 queue; when the host passed its binary, see
# bench/setup-peer.sh) and, on the 7.3 kernel, kublk, the kernel's selftest
# server (its null and loop targets, 1 queue, plain and --auto_zc; see
# bench/setup-kublk.sh), all in this one boot.  Order: for each round, for
# each workload, every configuration back to back (null, raw, qcow2
# preallocated via qublk -q1/-q2/ublksrv/qemu-nbd, qcow2 empty via qublk
# and qemu-nbd: ublksrv's qcow2 zero-fills new clusters with fallocate
# ZERO_RANGE, which tmpfs refuses, so it gets no empty image),
# each with its own device set up and torn down, so that a change in the
# host's load (the vCPUs are host threads) hits all of one workload's
# configurations alike.  One machine-readable line per run:
#
#   BENCH round=N img=KIND cfg=CONFIG wl=RW/BS st=ok|err|na riops=N
#         rbw=KiB/s wiops=N wbw=KiB/s srv=CPU% iowq=CPU% usr=CPU% fio=CPU%
#         tot=CPU% n=TICKS err=N [ev_NAME=COUNT ... evsecs=S]
#
# CPU%: percent of one vCPU over a window in the middle of the run (from
# /proc: the server daemon's threads, iowq the part of it in io_uring's
# io-wq workers, usr the user-space time of its other threads, the fio
# processes, and every non-idle tick of the machine); the host turns these
# into the tables.  Nothing here asserts performance: a run fails only if
# fio reports errors, the device cannot be set up, or qemu-img check finds
# an image damaged after qublk wrote to it.
#
# Memory: the raw and the preallocated qcow2 image (2 GiB each) and the
# empty one live at once in a tmpfs of their own (/bench, 90% of RAM), so
# the VM needs --mem 6G (bench/vm-ublk.sh passes it).
#
# Environment (set by the host with run.sh --env): BENCH_SIZE (2G),
# BENCH_RUNTIME (3 s), BENCH_RAMP (1 s), BENCH_ROUNDS (2), BENCH_QDEPTH
# (qublk -d, 128: the same as the nbd driver's tag set and ublksrv's
# default), BENCH_CACHE (none, or writeback when O_DIRECT fails on tmpfs),
# BENCH_ONLY (a regex on "KIND/CONFIG", default all), BENCH_WORKLOADS
# (space-separated RW/BS or RW/BS/jN for N fio jobs, default all five
# with 1 job), BENCH_KUBLK (1: run the kublk
# configurations, n/a without the binary; else they are left out),
# BENCH_EVENTS (1: count kernel events over each CPU window with the perf
# binary passed in; see window()).  The
# peers' binaries, if any, are /vmtest/ublksrv and /vmtest/kublk (file
# arguments of run.sh); so is a second qublk, /vmtest/qublk-b, for A/B
# runs (bench/vm-ublk.sh --ab).

SIZE=${BENCH_SIZE:-2G}
RUNTIME=${BENCH_RUNTIME:-3}
RAMP=${BENCH_RAMP:-1}
QDEPTH=${BENCH_QDEPTH:-128}
CACHE=${BENCH_CACHE:-none}
ONLY=${BENCH_ONLY:-.}
ROUNDS=${BENCH_ROUNDS:-2}
KUBLK=${BENCH_KUBLK:-0}
FS=${BENCH_FS:-tmpfs}
read -r -a WORKLOADS <<<"${BENCH_WORKLOADS:-randwrite/4k randread/4k randrw/4k rw/64k rw/512k}"
B=/bench
PATH=$VMTEST_DIR:$PATH
# The sampling helpers are noise on the console (read by guest-lib's vmtest).
# shellcheck disable=SC2034
VMTEST_XTRACE=0

# shellcheck source=bench/vm-lib.guest.sh
. "$VMTEST_DIR/vm-lib.guest.sh"
bench_mount

# ---- CPU accounting ------------------------------------------------------

# snap PID...: the processes' live threads, one line each: "TID TICKS IOWQ
# UTIME": TICKS is utime+stime, IOWQ 1 for io_uring's io-wq workers
# (iou-wrk-*, the threads io_uring punts a request to when the file cannot
# take it without blocking), UTIME the user-space part.
# shellcheck disable=SC2086  # PID lists are split on purpose
snap() {
    local p t s v
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            s=$(cat "$t/stat" 2>/dev/null) || continue
            # after "pid (comm) ": state is field 1, utime 12, stime 13
            v=${s##*) }
            # shellcheck disable=SC2086  # split the fields
            set -- $v
            case $s in *'(iou-wrk'*) v=1 ;; *) v=0 ;; esac
            echo "${t##*/} $((${12} + ${13})) $v ${12}"
        done
    done
}

# ticks SNAP0 SNAP1: the CPU ticks between two snaps, as "ALL IOWQ USER"
# (USER: the utime of the threads other than io-wq's, the server's own
# code).  Per thread: one in both counts the difference, one born in
# between all of its ticks, one that exited in between nothing (lost: a
# sum over the live threads would drop its earlier ticks too and could go
# negative).
ticks() {
    awk 'NR == FNR { t[$1] = $2; u[$1] = $4; next }
        { d = $2 - t[$1]; all += d; if ($3 == 1) wq += d; else usr += $4 - u[$1] }
        END { printf "%d %d %d\n", all, wq, usr }' "$1" "$2"
}

# ---- event counts (BENCH_EVENTS=1) --------------------------------------

# Kernel tracepoints counted machine-wide over the CPU window by perf stat
# (the host's perf, a file argument of run.sh): exact counts, unlike TCG's
# timing, so that two servers' paths can be compared per request: context
# switches, wakeups, rescheduling and function-call IPIs, io_uring_enter
# calls and all system calls, SQEs, punts to io-wq, user page faults.
# NAME=TRACEPOINT; those this kernel lacks are left out (said once in the
# log).  EV_ARGS: perf's -e arguments for the ones kept.
EVENT_DEFS=(csw=sched:sched_switch wake=sched:sched_wakeup
            ipi_resched=irq_vectors:reschedule_entry
            ipi_call=irq_vectors:call_function_single_entry
            enter=syscalls:sys_enter_io_uring_enter sys=raw_syscalls:sys_enter
            sqe=io_uring:io_uring_submit_req iowq=io_uring:io_uring_queue_async_work
            fault=exceptions:page_fault_user)
EVENTS=() EV_ARGS=() EV_PID=''
setup_events() {
    [ "${BENCH_EVENTS:-0}" = 1 ] || return 0
    command -v perf >/dev/null || { echo "BENCH_EVENTS=1 but no perf in the guest" >&2; exit 1; }
    echo -1 >/proc/sys/kernel/perf_event_paranoid
    local d
    for d in "${EVENT_DEFS[@]}"; do
        if perf stat -a -x, -e "${d#*=}" -- true >/dev/null 2>&1; then
            EVENTS+=("$d")
            EV_ARGS+=(-e "${d#*=}")
        else
            echo "events: this kernel has no ${d#*=}"
        fi
    done
    [ "${#EVENTS[@]}" -gt 0 ] || { echo "perf counts none of the events here" >&2; exit 1; }
    # Attach perf's probes to the tracepoints now, while nothing runs, and
    # keep them: the first probe on a tracepoint patches the kernel's code
    # at its call sites, and under TCG a vCPU that is running that code
    # meanwhile can hit the breakpoint the patching leaves there (an
    # "Oops: int3" in io_submit_sqes, seen when a window's perf started
    # under load).  The windows' perf stat then only adds counters.
    perf stat -a -x, -o /dev/null "${EV_ARGS[@]}" -- sleep 1000000 >/dev/null 2>&1 &
    EV_PID=$!
    sleep 2
}

# window SECS: sleep SECS, counting EVENTS meanwhile when there are any;
# prints " ev_NAME=COUNT ..." (empty without events) for the BENCH line.
window() {
    local secs=$1
    if [ "${#EVENTS[@]}" = 0 ]; then
        sleep "$secs"
        return 0
    fi
    perf stat -a -x, -o "$B/ev.out" "${EV_ARGS[@]}" -- sleep "$secs" >/dev/null 2>&1 || return 0
    # -x, lines: COUNT,UNIT,EVENT,... in the order of EV_ARGS
    awk -F, -v defs="${EVENTS[*]}" '
        BEGIN { n = split(defs, d, " "); for (i = 1; i <= n; i++) { split(d[i], p, "="); name[p[2]] = p[1] } }
        ($3 in name) && $1 ~ /^[0-9]+$/ { printf " ev_%s=%s", name[$3], $1 }' "$B/ev.out"
    printf ' evsecs=%s' "$secs"
}

# busy: non-idle ticks of all CPUs (user nice system idle iowait irq softirq steal).
busy() {
    local _c u n s i w q sq st
    read -r _c u n s i w q sq st _ </proc/stat
    echo $((u + n + s + q + sq + st)) $((u + n + s + i + w + q + sq + st))
}

# ---- one fio run ---------------------------------------------------------

# run_fio IMG CFG DEV WORKLOAD SRVPIDS: fio on DEV, sampling CPU in the
# middle of the run; prints the BENCH line.  Returns 1 on fio errors.
# shellcheck disable=SC2086  # PID lists are split on purpose
run_fio() {
    local img=$1 cfg=$2 dev=$3 wl=$4 srvpids=$5
    # RW/BS, or RW/BS/jN for N fio jobs (each with the whole depth)
    local rw=${wl%%/*} bs=${wl#*/} jobs=1 out=$B/fio.out fpid
    if [[ $bs == */j* ]]; then jobs=${bs##*/j} bs=${bs%%/*}; fi
    local srv wq usr fio b0 b1 t0 t1 fiopids st=ok evs
    fio --name=bench --filename="$dev" --ioengine=libaio --direct=1 \
        --bs="$bs" --iodepth=128 --iodepth_batch_submit=16 \
        --iodepth_batch_complete_min=16 --numjobs="$jobs" --rw="$rw" \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --group_reporting --output-format=terse --terse-version=3 \
        >"$out" 2>&1 &
    fpid=$!
    # Window: from after the ramp (and fio's start-up) to before the end.
    sleep "$(awk -v r="$RAMP" 'BEGIN { print r + 0.5 }')"
    fiopids=$(pidof fio)
    snap $srvpids >"$B/srv0"
    snap $fiopids >"$B/fio0"
    read -r b0 t0 < <(busy)
    evs=$(window "$(awk -v t="$RUNTIME" 'BEGIN { print (t > 1.5 ? t - 1 : 0.5) }')")
    snap $srvpids >"$B/srv1"
    snap $fiopids >"$B/fio1"
    read -r b1 t1 < <(busy)
    read -r srv wq usr < <(ticks "$B/srv0" "$B/srv1")
    read -r fio _ < <(ticks "$B/fio0" "$B/fio1")
    if [ "$wl" = randread/4k ] && [ "${CUR_ROUND:-1}" = 1 ]; then
        # One snapshot per configuration, for the log.
        echo "top during $img $cfg $wl:"
        top -b -n1 | head -n 14
        local p
        for p in $srvpids; do
            for t in /proc/"$p"/task/*; do
                echo "  thread ${t##*/} $(cut -d' ' -f2 "$t/stat") utime+stime=$(awk '{ print $14 + $15 }' "$t/stat")"
            done
        done
    fi
    wait "$fpid" || st=err
    local line
    line=$(grep '^3;' "$out" | tail -n 1)
    if [ -z "$line" ]; then
        st=err
        cat "$out"
        line='3;;;;1;0;0;0'
    fi
    local tot=$((t1 - t0))
    [ "$tot" -gt 0 ] || tot=1
    # Percent of one vCPU: ticks / (window ticks / nr_cpus).
    local ncpu
    ncpu=$(grep -c '^cpu[0-9]' /proc/stat)
    echo "$line" | awk -F';' -v round="${CUR_ROUND:-1}" -v img="$img" -v cfg="$cfg" -v wl="$wl" -v st="$st" \
        -v srv="$srv" -v wq="$wq" -v usr="$usr" -v fio="$fio" -v bsy=$((b1 - b0)) \
        -v win="$tot" -v ncpu="$ncpu" -v evs="$evs" '{
            if ($5 != 0) st = "err"
            w = win / ncpu
            printf "BENCH round=%s img=%s cfg=%s wl=%s st=%s riops=%d rbw=%d wiops=%d wbw=%d srv=%.0f iowq=%.0f usr=%.0f fio=%.0f tot=%.0f n=%d err=%s%s\n",
                round, img, cfg, wl, st, $8, $7, $49, $48, 100 * srv / w, 100 * wq / w, 100 * usr / w, 100 * fio / w, 100 * bsy / w, win, $5, evs
        }'
    [ "$st" = ok ] || { cat "$out"; return 1; }
}

na_line() { echo "BENCH round=${CUR_ROUND:-1} img=$1 cfg=$2 wl=$3 st=na"; }

# ---- servers -------------------------------------------------------------

# Each start_* prints the device; stop_* takes it down and waits until the
# server has closed the image.
devnum() { echo "${1#/dev/ublkb}"; }

# $QBIN: qublk, or qublk-b for the B configurations (run.sh --ab).
QBIN=qublk
start_qublk() { # TYPE QUEUES [FILE | --size S]
    local type=$1 q=$2; shift 2
    "$QBIN" add -t "$type" -q "$q" -d "$QDEPTH" --cache "$CACHE" "$@" \
        2>"$B/add.err" || { cat "$B/add.err" >&2; return 1; }
}
stop_qublk() { # DEV
    "$QBIN" del -n "$(devnum "$1")"
    [ ! -e "$1" ]
}


start_nbd() { # FMT FILE
    # -c daemonises (the parent returns once the device is connected); the
    # daemon must not hold our stdout.
    qemu-nbd -c /dev/nbd0 -f "$1" --cache="$CACHE" --aio=io_uring \
        "$2" >"$B/nbd.log" 2>&1 </dev/null || { cat "$B/nbd.log" >&2; return 1; }
    local i
    for ((i = 0; i < 100; i++)); do
        [ "$(cat /sys/block/nbd0/size)" != 0 ] && { echo /dev/nbd0; return 0; }
        sleep 0.1
    done
    echo "nbd0 never got a size" >&2
    return 1
}
stop_nbd() {
    local i
    qemu-nbd -d /dev/nbd0 >/dev/null
    for ((i = 0; i < 100; i++)); do
        pidof qemu-nbd >/dev/null || return 0
        sleep 0.1
    done
    echo "qemu-nbd did not exit" >&2
    return 1
}

# ---- images --------------------------------------------------------------

# ---- one run: set up, fio, tear down ------------------------------------

IMG_RAW=$B/img.raw IMG_PRE=$B/img-prealloc.qcow2 IMG_EMPTY=$B/img-empty.qcow2
IMG_SPARSE=$B/img-sparse.raw

# one_run KIND CFG WL: KIND none (null), raw, prealloc or empty; CFG null,
# raw, qublk-q1, qublk-q2, qemu-nbd or ublksrv (ublksrv's null, loop or
# qcow2 target by KIND), kublk, kublk-zc or kublk-zcb (kublk's null or
# loop target by KIND, kublk-zc with --auto_zc, kublk-zcb with --auto_zc
# -b); null-q2: null with 2 queues; null-b, null-b-q2, raw-b, qublk-b-q1,
# qublk-b-q2:
# the same through the B binary (qublk-b, bench/vm-ublk.sh --ab).  The device is
# set up for this run
# alone, so that the configurations of one workload run back to back
# (interleaved: a change in the host's load hits them alike).  The empty
# qcow2 is recreated before every run, so every run starts from an empty
# image.
one_run() {
    local kind=$1 cfg=$2 wl=$3 dev pids fmt=qcow2 img rc=0
    case $kind in
        none) fmt='' img='' ;;
        raw) fmt=raw img=$IMG_RAW ;;
        prealloc) img=$IMG_PRE ;;
        empty) img=$IMG_EMPTY; mk_image empty "$img" ;;
        sparse) fmt=raw img=$IMG_SPARSE; mk_image sparse "$img" ;;
    esac
    if { [ "$cfg" = ublksrv ] && ! have_ublksrv; } || { [[ $cfg = kublk* ]] && ! have_kublk; }; then
        na_line "$kind" "$cfg" "$wl"
        return 0
    fi
    local scfg=$cfg
    QBIN=qublk
    case $cfg in
        null-b|null-b-q2|raw-b|qublk-b-q*) QBIN=qublk-b scfg=${cfg/-b/} ;;
    esac
    case $scfg in
        null) dev=$(start_qublk null 1 --size "$SIZE") ;;
        null-q2) dev=$(start_qublk null 2 --size "$SIZE") ;;
        raw) dev=$(start_qublk raw 1 "$img") ;;
        qublk-q*) dev=$(start_qublk "$fmt" "${scfg#qublk-q}" "$img") ;;
        qemu-nbd) dev=$(start_nbd "$fmt" "$img") ;;
        ublksrv)
            case $kind in
                none) dev=$(start_ublksrv null) ;;
                raw) dev=$(start_ublksrv loop "$img") ;;
                *) dev=$(start_ublksrv qcow2 "$img") ;;
            esac ;;
        kublk|kublk-zc|kublk-zcb)
            local zc=()
            case $cfg in
                kublk-zc) zc=(--auto_zc) ;;
                kublk-zcb) zc=(--auto_zc -b) ;;
            esac
            case $kind in
                none) dev=$(start_kublk null "${zc[@]}") ;;
                *) dev=$(start_kublk loop "${zc[@]}" "$img") ;;
            esac ;;
    esac || {
        if grep -q 'not yet' "$B/add.err" 2>/dev/null; then
            na_line "$kind" "$cfg" "$wl"
            return 0
        fi
        echo "BENCH round=${CUR_ROUND:-1} img=$kind cfg=$cfg wl=$wl st=err (setup failed)"
        return 1
    }
    [ -b "$dev" ]
    case $cfg in
        qemu-nbd) pids=$(pidof qemu-nbd) ;;
        ublksrv) pids=$(pidof ublksrv) ;;
        kublk*) pids=$(pidof kublk) ;;
        # (qublk-b may be a script that execs a qublk binary)
        *) pids=$(pidof qublk qublk-b) ;;
    esac
    run_fio "$kind" "$cfg" "$dev" "$wl" "$pids" || rc=1
    case $cfg in
        qemu-nbd) stop_nbd ;;
        ublksrv) stop_ublksrv ;;
        kublk*) stop_kublk ;;
        *) stop_qublk "$dev" ;;
    esac
    # After qublk wrote to an empty image under load, it must check clean
    # (the preallocated one is checked at the end of each round).
    if [ "$kind" = empty ] && [ "$cfg" != qemu-nbd ] && [ "$wl" != randread/4k ]; then
        qemu-img check -q "$img" || { echo "qemu-img check failed after $cfg $wl"; rc=1; }
    fi
    [ "$kind" != sparse ] || drop "$img"
    return "$rc"
}

# bench_wl ROUND WL: every configuration on this workload (the B ones
# next to their A ones when there is a qublk-b).
bench_wl() {
    local round=$1 wl=$2 kind cfg rc=0 kc
    for kc in none/null none/null-b none/null-q2 none/null-b-q2 none/ublksrv none/kublk none/kublk-zc none/kublk-zcb \
              raw/raw raw/raw-b raw/ublksrv raw/kublk raw/kublk-zc raw/kublk-zcb sparse/raw sparse/raw-b \
              prealloc/qublk-q1 prealloc/qublk-b-q1 prealloc/qublk-q2 prealloc/qublk-b-q2 \
              prealloc/ublksrv prealloc/qemu-nbd \
              empty/qublk-q1 empty/qublk-b-q1 empty/qublk-q2 empty/qublk-b-q2 empty/qemu-nbd; do
        [[ $kc =~ $ONLY ]] || continue
        case $kc in
            */null-b*|*/raw-b|*/qublk-b-*) command -v qublk-b >/dev/null || continue ;;
            */kublk*) [ "$KUBLK" = 1 ] || continue ;;
        esac
        kind=${kc%/*} cfg=${kc#*/}
        CUR_ROUND=$round
        one_run "$kind" "$cfg" "$wl" || rc=1
    done
    return "$rc"
}

t_check_prealloc() {
    qemu-img check "$IMG_PRE"
}

# ---- main ----------------------------------------------------------------

t_setup() {
    need fio qemu-img qublk qemu-nbd
    [ -b /dev/nbd0 ] || fail "/dev/nbd0 missing (nbd module not loaded?)"
    # O_DIRECT on tmpfs (Linux >= 6.6); the host picks writeback otherwise.
    if [ "$CACHE" = none ]; then
        dd if=/dev/zero of="$B/odirect" bs=4k count=1 oflag=direct status=none \
            || fail "O_DIRECT fails on tmpfs: rerun with BENCH_CACHE=writeback"
        rm -f "$B/odirect"
    fi
    # qemu-nbd -c binds a lock socket there.
    mkdir -p /var/lock
    # Warm-up, not recorded: under TCG the first run of a code path pays for
    # its translation, which would penalise whichever configuration ran first.
    local dev
    dev=$(start_qublk null 1 --size 1G)
    fio --name=warm --filename="$dev" --ioengine=libaio --direct=1 --bs=4k \
        --iodepth=128 --rw=randrw --time_based --runtime=2 >/dev/null
    stop_qublk "$dev"
    echo "BENCH-CONF size=$SIZE runtime=$RUNTIME ramp=$RAMP rounds=$ROUNDS qdepth=$QDEPTH cache=$CACHE fs=$FS ncpu=$(grep -c '^cpu[0-9]' /proc/stat) kernel=$(uname -r) mem=$(awk '/MemTotal/ { print $2 }' /proc/meminfo)kB"
    df -h "$B"
}
# Outside vmtest's subshell: the runs read EVENTS.
setup_events
vmtest bench-setup t_setup

t_images() {
    mk_image raw "$IMG_RAW"
    mk_image prealloc "$IMG_PRE"
    df -h "$B"
}
vmtest bench-images t_images

for ((round = 1; round <= ROUNDS; round++)); do
    for wl in "${WORKLOADS[@]}"; do
        vmtest "bench-r$round-${wl/\//-}" bench_wl "$round" "$wl"
    done
    vmtest "bench-r$round-check" t_check_prealloc
done
rm -f "$IMG_RAW" "$IMG_PRE" "$IMG_EMPTY"
[ -z "$EV_PID" ] || kill "$EV_PID" 2>/dev/null || true
