#!/bin/bash
# `qublk check` vs `qemu-img check` on the same image, side by side.
# Not a test: prints a markdown row of wall-clock seconds (median of
# ROUNDS interleaved runs) and the ratio.
#
#   bench/check.sh [ROUNDS]
#
# Image (in /dev/shm): 100 GiB virtual, 64 KiB clusters, a quarter
# allocated: qemu-img create -o preallocation=metadata at 25 GiB (every
# cluster of it mapped, the file sparse), then resized to 100 GiB.
# Both tools must report it clean.
set -euo pipefail
cd "$(dirname "$0")/.."
QUBLK=${QUBLK:-build/qublk}
ROUNDS=${1:-5}
DIR=$(mktemp -d /dev/shm/qublk-bench-check.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
IMG=$DIR/big.qcow2

qemu-img create -q -f qcow2 -o cluster_size=65536,preallocation=metadata "$IMG" 25G
qemu-img resize -q "$IMG" 100G
"$QUBLK" check "$IMG" >/dev/null || { echo "qublk check: not clean" >&2; exit 1; }
qemu-img check "$IMG" >/dev/null || { echo "qemu-img check: not clean" >&2; exit 1; }
"$QUBLK" check "$IMG" | sed -n 2p >&2

secs() { # command... : wall seconds
	local t0 t1
	t0=$(date +%s.%N)
	"$@" >/dev/null
	t1=$(date +%s.%N)
	echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR + 1) / 2)]}'; }

q=() e=()
for _ in $(seq "$ROUNDS"); do
	q+=("$(secs "$QUBLK" check "$IMG")")
	e+=("$(secs qemu-img check "$IMG")")
done
qm=$(printf '%s\n' "${q[@]}" | median)
em=$(printf '%s\n' "${e[@]}" | median)
echo "| image | qublk check (s) | qemu-img check (s) | qemu-img / qublk |"
echo "|---|---:|---:|---:|"
printf '| 100 GiB, 64 KiB clusters, 25 GiB allocated | %s | %s | %.2fx |\n' "$qm" "$em" \
	"$(echo "$em / $qm" | bc -l)"
