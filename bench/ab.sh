#!/bin/bash
# A/B of two qublk binaries on the engine (`qublk bench`, no frontend):
# the same workloads on fresh identical images, the two binaries
# alternating within every round, so that machine noise hits both alike.
# Prints per row the median IOPS of each, the median of the per-round
# ratios B/A (with min-max), and the median CPU time per request of each
# (all threads, kernel included, from `perf stat -e task-clock`: less
# sensitive than IOPS to other load on the machine).  Not a test: numbers.
#
#   bench/ab.sh [-r ROUNDS] [-c COUNT] A_BIN B_BIN
#
# Rows: 4k sequential read and write (qemu-img bench's pattern) and 4k
# random write, at depth 32 and 1, on a 1 GiB qcow2 (64 KiB clusters)
# preallocated (preallocation=falloc) and empty, --cache none, /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=5
COUNT=100000
while getopts r:c: o; do
	case $o in
	r) ROUNDS=$OPTARG ;;
	c) COUNT=$OPTARG ;;
	*) echo "usage: $0 [-r ROUNDS] [-c COUNT] A_BIN B_BIN" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# = 2 ] || { echo "usage: $0 [-r ROUNDS] [-c COUNT] A_BIN B_BIN" >&2; exit 2; }
A=$1 B=$2
DIR=$(mktemp -d /dev/shm/qublk-ab.XXXXXX)
trap 'rm -rf "$DIR"' EXIT

mkimg() { # kind path
	case $1 in
	prealloc) qemu-img create -q -f qcow2 -o preallocation=falloc "$2" 1G ;;
	empty) qemu-img create -q -f qcow2 "$2" 1G ;;
	esac
}

# run BIN KIND DEPTH ARGS...: prints "IOPS CPU-us-per-request".
run() {
	local bin=$1 kind=$2 depth=$3; shift 3
	local iops ms n
	mkimg "$kind" "$DIR/i.qcow2"
	perf stat -x, -e task-clock -o "$DIR/perf" \
		"$bin" bench -f qcow2 -t none -s 4096 -d "$depth" "$@" "$DIR/i.qcow2" >"$DIR/out"
	iops=$(sed -n 's/^IOPS: \([0-9]*\).*/\1/p' "$DIR/out")
	ms=$(awk -F, '/task-clock/ { print $1 }' "$DIR/perf")
	n=$(printf '%s\n' "$@" | awk 'p { print; exit } $0 == "-c" { p = 1 }')
	awk -v i="$iops" -v ms="$ms" -v n="$n" 'BEGIN { printf "%d %.2f\n", i, ms * 1000 / n }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "| workload | image | depth | A IOPS | B IOPS | B/A median (min-max) | A CPU us/req | B CPU us/req |"
echo "|---|---|---|---:|---:|---|---:|---:|"
for wl in "seq read" "seq write" "rand write"; do
	for depth in 32 1; do
		for kind in prealloc empty; do
			[ "$wl" != "seq read" ] || [ "$kind" = prealloc ] || continue
			args=(-c "$COUNT")
			[ "$depth" = 32 ] || args=(-c $((COUNT / 4)))
			case $wl in
			"seq write") args+=(-w) ;;
			"rand write") args+=(-w --random) ;;
			esac
			: >"$DIR/a" ; : >"$DIR/b" ; : >"$DIR/r" ; : >"$DIR/ca" ; : >"$DIR/cb"
			for ((i = 0; i < ROUNDS; i++)); do
				if ((i % 2)); then
					read -r b bc < <(run "$B" "$kind" "$depth" "${args[@]}")
					read -r a ac < <(run "$A" "$kind" "$depth" "${args[@]}")
				else
					read -r a ac < <(run "$A" "$kind" "$depth" "${args[@]}")
					read -r b bc < <(run "$B" "$kind" "$depth" "${args[@]}")
				fi
				echo "$a" >>"$DIR/a"
				echo "$b" >>"$DIR/b"
				echo "$ac" >>"$DIR/ca"
				echo "$bc" >>"$DIR/cb"
				awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f\n", b / a }' >>"$DIR/r"
			done
			printf '| %s 4k | %s | %s | %s | %s | %.2fx (%.2f-%.2f) | %s | %s |\n' \
				"$wl" "$kind" "$depth" \
				"$(median <"$DIR/a")" "$(median <"$DIR/b")" "$(median <"$DIR/r")" \
				"$(sort -n "$DIR/r" | head -1)" "$(sort -n "$DIR/r" | tail -1)" \
				"$(median <"$DIR/ca")" "$(median <"$DIR/cb")"
		done
	done
done
