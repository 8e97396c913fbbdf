#!/bin/bash
# Side-by-side benchmarks of qublk against QEMU on tmpfs-backed images.
# Not part of `make check`: numbers, not pass/fail.  Prints a markdown
# table of IOPS and the qublk/QEMU ratio per row.
#
#   bench/run.sh [--quick] [--only engine|nbd|convert]
#
# Rows:
#  engine: `qublk bench` vs `qemu-img bench` (same count, depth, size,
#          cache mode; qemu-img bench's sequential pattern), plus qublk
#          bench on a raw image as the ceiling.
#  nbd:    fio's nbd engine against `qublk nbd` and `qemu-nbd`
#          (--cache=none --aio=io_uring) serving the same image, 4k
#          random read/write, plus `qublk nbd` on raw as the ceiling.
#  convert: seconds for `qemu-img convert` (NBD -> sparse raw on tmpfs) of
#          a 4 GiB qcow2 image with 10% allocated (1 MiB in every 10 MiB),
#          served by `qublk nbd` and by `qemu-nbd`, same cache options;
#          its own table (seconds, and qemu-nbd's time / qublk's).
# Images: 1 GiB qcow2 (64k clusters), preallocated (preallocation=falloc)
# and empty; a 1 GiB raw file.  All in /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
QUBLK=${QUBLK:-build/qublk}
DIR=$(mktemp -d /dev/shm/qublk-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
QUICK=0
ONLY=""
while [ $# -gt 0 ]; do
	case $1 in
	--quick) QUICK=1 ;;
	--only) ONLY=$2; shift ;;
	*) echo "usage: $0 [--quick] [--only engine|nbd|convert]" >&2; exit 2 ;;
	esac
	shift
done
COUNT=${QUBLK_BENCH_COUNT:-$(( QUICK ? 50000 : 200000 ))}
RUNTIME=${QUBLK_BENCH_RUNTIME:-$(( QUICK ? 5 : 15 ))}
SIZE=1G

mkimg() { # kind path
	case $1 in
	prealloc) qemu-img create -q -f qcow2 -o preallocation=falloc "$2" $SIZE ;;
	empty) qemu-img create -q -f qcow2 "$2" $SIZE ;;
	raw) qemu-img create -q -f raw -o preallocation=falloc "$2" $SIZE ;;
	esac
}

iops_of() { sed -n 's/^IOPS: \([0-9]*\).*/\1/p'; }

# qemu-img bench prints "Run completed in X seconds."
qemu_bench_iops() { # count secs
	awk -v c="$1" '/Run completed in/ { printf "%d", c / $4 }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

# This machine is itself a VM whose memory its host backs on first touch:
# a write into a tmpfs page that comes from never-touched memory costs a
# host fault, and the depth-32 write rows then measured that (84k-240k
# IOPS for qublk in one hour, 600k-850k once the memory had been used).
# Touch 4 GiB once, so that the images' pages come from memory the host
# backs already; the ratios then compare the software.
warm_memory() {
	local avail
	avail=$(awk '/^MemAvailable:/ { print int($2 / 1048576) }' /proc/meminfo)
	[ "$avail" -ge 12 ] || return 0
	dd if=/dev/zero of="$DIR/warm" bs=1M count=4096 status=none
	rm -f "$DIR/warm"
}
warm_memory

echo "| workload | image | depth | qublk IOPS | QEMU IOPS | ratio | raw (qublk) IOPS |"
echo "|---|---|---|---|---|---|---|"

if [ -z "$ONLY" ] || [ "$ONLY" = engine ]; then
for mode in read write; do
for depth in 32 1; do
for kind in prealloc empty; do
	cnt=$COUNT
	[ "$depth" = 1 ] && cnt=$((COUNT / 4))
	wflag=""; [ $mode = write ] && wflag="-w"
	mkimg "$kind" "$DIR/q.qcow2"
	q=$("$QUBLK" bench -f qcow2 $wflag -d "$depth" -c "$cnt" -s 4096 -t none "$DIR/q.qcow2" | iops_of)
	mkimg "$kind" "$DIR/q.qcow2"
	e=$(qemu-img bench -f qcow2 $wflag -d "$depth" -c "$cnt" -s 4096 -t none -i io_uring "$DIR/q.qcow2" | qemu_bench_iops "$cnt")
	mkimg raw "$DIR/r.raw"
	r=$("$QUBLK" bench -f raw $wflag -d "$depth" -c "$cnt" -s 4096 -t none "$DIR/r.raw" | iops_of)
	echo "| bench seq $mode 4k | $kind | $depth | $q | $e | $(ratio "$q" "$e") | $r |"
done
done
done
fi

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; return 1; }

fio_nbd() { # sock rw depth
	fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs=4k \
	    --iodepth="$3" --numjobs=1 --time_based --runtime="$RUNTIME" --size=$SIZE \
	    --output-format=json 2>/dev/null |
	/usr/bin/python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

serve_qublk() { # fmt img sock
	"$QUBLK" nbd --format "$1" --cache none --shared 8 --socket "$3" "$2" 2>/dev/null &
	wait_sock "$3"
}
serve_qemu() { # img sock
	qemu-nbd -f qcow2 --cache=none --aio=io_uring --persistent --shared=8 --discard=unmap --socket "$2" "$1" 2>/dev/null &
	wait_sock "$2"
}
stop_server() { kill %% 2>/dev/null || true; wait 2>/dev/null || true; }

if [ -z "$ONLY" ] || [ "$ONLY" = nbd ]; then
for rw in randread randwrite; do
for depth in 32 1; do
for kind in prealloc empty; do
	mkimg "$kind" "$DIR/q.qcow2"
	serve_qublk qcow2 "$DIR/q.qcow2" "$DIR/s1"; q=$(fio_nbd "$DIR/s1" $rw $depth); stop_server
	rm -f "$DIR/s1"
	mkimg "$kind" "$DIR/q.qcow2"
	serve_qemu "$DIR/q.qcow2" "$DIR/s2"; e=$(fio_nbd "$DIR/s2" $rw $depth); stop_server
	rm -f "$DIR/s2"
	mkimg raw "$DIR/r.raw"
	serve_qublk raw "$DIR/r.raw" "$DIR/s3"; r=$(fio_nbd "$DIR/s3" $rw $depth); stop_server
	rm -f "$DIR/s3"
	echo "| fio nbd $rw 4k | $kind | $depth | $q | $e | $(ratio "$q" "$e") | $r |"
done
done
done
fi

if [ -z "$ONLY" ] || [ "$ONLY" = convert ]; then
	qemu-img create -q -f qcow2 "$DIR/c.qcow2" 4G
	for i in $(seq 0 409); do echo "write -P $((i % 250 + 1)) $((i * 10))M 1M"; done |
		qemu-io -f qcow2 "$DIR/c.qcow2" >/dev/null
	conv_secs() { # sock
		local t0 t1
		rm -f "$DIR/out.raw"
		t0=$(date +%s.%N)
		qemu-img convert -f raw -O raw "nbd+unix:///?socket=$1" "$DIR/out.raw"
		t1=$(date +%s.%N)
		awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
	}
	serve_qublk qcow2 "$DIR/c.qcow2" "$DIR/s4"; q=$(conv_secs "$DIR/s4"); stop_server
	rm -f "$DIR/s4"
	serve_qemu "$DIR/c.qcow2" "$DIR/s5"; e=$(conv_secs "$DIR/s5"); stop_server
	rm -f "$DIR/s5"
	echo
	echo "| workload | qublk s | qemu-nbd s | ratio (qemu-nbd / qublk) |"
	echo "|---|---|---|---|"
	echo "| qemu-img convert 4 GiB, 10% allocated | $q | $e | $(ratio "$e" "$q") |"
fi
