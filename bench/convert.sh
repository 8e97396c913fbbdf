#!/bin/bash
# SPDX-License-Identifier: MIT
# `qublk convert` vs `qemu-img convert` side by side on the same 1 GiB
# image of mixed data: raw -> qcow2 plain, and compressed (-c) with zlib
# and with zstd.  Not a test: prints a markdown table of wall-clock
# seconds (median and min-max of ROUNDS runs, the two tools alternating
# within every round so that machine noise hits both alike), CPU seconds
# (user+sys, median), the output's allocated size, and the ratio of the
# medians, wall and CPU (qemu-img's / qublk's: above 1, qublk does better).
# Both run with their defaults (qublk: -m 8, --threads one per CPU up to
# 4; qemu-img: -m 8, compression in its thread pool).
#
#   bench/convert.sh [ROUNDS]
#
# Source (in /dev/shm): a 1 GiB raw file, per MiB in turn text-like data
# (words, compressible), random bytes, zeros written as data, text, a
# hole, random, text, zeros...: 3/8 text, 2/8 random, 2/8 written zeros,
# 1/8 hole.  Output: qcow2, 64 KiB clusters (compression_type=zlib|zstd
# for -c), written to /dev/shm and removed after each run.  Every output
# is checked equal to the source with qemu-img compare in the first round.
# Needs about 2 GiB free in /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
QUBLK=${QUBLK:-build/qublk}
ROUNDS=${1:-3}
DIR=$(mktemp -d /dev/shm/qublk-bench-convert.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
SRC=$DIR/mixed.raw

python3 - "$SRC" <<'PYEOF'
import os, random, sys
r = random.Random(1)
words = [w.encode() for w in (
    "the of and to in is that for it as was with be by on not he this are or "
    "his from at which but have an they you were her she there been one all "
    "qcow2 cluster refcount table header backing image write read zero data "
    "ublk queue io_uring coroutine request block device kernel").split()]
def text(n):
    out = bytearray()
    while len(out) < n:
        line = b" ".join(r.choice(words) for _ in range(r.randint(4, 14)))
        out += line + (b".\n" if r.random() < 0.3 else b", ")
    return bytes(out[:n])
M = 1 << 20
pool = [text(M) for _ in range(32)]
kinds = ["text", "random", "zero", "text", "hole", "random", "text", "zero"]
with open(sys.argv[1], "wb") as f:
    for i in range(1024):
        k = kinds[i % len(kinds)]
        if k == "text":
            f.write(pool[i % len(pool)])
        elif k == "random":
            f.write(os.urandom(M))
        elif k == "zero":
            f.write(bytes(M))
        else:
            f.seek(M, 1)
    f.truncate(1024 * M)
PYEOF

# run TOOL MODE OUT: prints "wall cpu" seconds.  MODE: plain, zlib, zstd.
run() {
	local tool=$1 mode=$2 out=$3 t
	local -a args=(-O qcow2)
	[ "$mode" = plain ] || args+=(-c -o "compression_type=$mode")
	rm -f "$out"
	TIMEFORMAT='%R %U %S'
	if [ "$tool" = qublk ]; then
		t=$( { time "$QUBLK" convert "${args[@]}" "$SRC" "$out" >/dev/null; } 2>&1 )
	else
		t=$( { time qemu-img convert "${args[@]}" "$SRC" "$out" >/dev/null; } 2>&1 )
	fi
	echo "$t" | awk '{printf "%.3f %.3f\n", $1, $2 + $3}'
}
# median/range "V1 V2 ...": of a space-separated list of numbers.
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR + 1) / 2)]}'; }
range() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.2f-%.2f", lo, hi}'; }

MODES="plain zlib zstd"
declare -A wall cpu size
for round in $(seq "$ROUNDS"); do
	for codec in $MODES; do
		# Alternate which tool goes first from round to round.
		tools="qublk qemu-img"
		[ $((round % 2)) = 1 ] || tools="qemu-img qublk"
		for tool in $tools; do
			out=$DIR/out-$tool-$codec.qcow2
			read -r w c < <(run "$tool" "$codec" "$out")
			wall[$tool-$codec]+="$w "
			cpu[$tool-$codec]+="$c "
			size[$tool-$codec]=$(du -B1 "$out" | cut -f1)
			if [ "$round" = 1 ]; then
				qemu-img compare -q "$SRC" "$out" || { echo "$out differs from the source" >&2; exit 1; }
			fi
			rm -f "$out"
			echo "round $round $codec $tool: ${w}s wall, ${c}s CPU, ${size[$tool-$codec]} bytes" >&2
		done
	done
done

echo "| mode | tool | wall s, median (min-max) | CPU s, median | allocated MiB | wall, CPU: qemu-img / qublk |"
echo "|---|---|---:|---:|---:|---:|"
ratio() { echo "$1 / $2" | bc -l | xargs printf '%.2fx'; }
for codec in $MODES; do
	qw=$(median "${wall[qublk-$codec]}")
	ew=$(median "${wall[qemu-img-$codec]}")
	qc=$(median "${cpu[qublk-$codec]}")
	ec=$(median "${cpu[qemu-img-$codec]}")
	for tool in qublk qemu-img; do
		k=$tool-$codec
		r=""
		[ "$tool" = qemu-img ] || r="$(ratio "$ew" "$qw"), $(ratio "$ec" "$qc")"
		printf '| %s | %s | %s (%s) | %s | %.1f | %s |\n' "$codec" "$tool" \
			"$(median "${wall[$k]}")" "$(range "${wall[$k]}")" \
			"$(median "${cpu[$k]}")" \
			"$(echo "${size[$k]} / 1048576" | bc -l)" "$r"
	done
done
