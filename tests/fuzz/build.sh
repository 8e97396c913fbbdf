#!/bin/sh
# Build the libFuzzer harness for the qcow2 header and snapshot parsers.
# Usage: tests/fuzz/build.sh [OUT]      (default build/fuzz_header)
# Run:   build/fuzz_header -max_total_time=60 [CORPUS_DIR]
# Seed corpus idea: a few images from `qemu-img create` / `qemu-img snapshot`.
set -e
cd "$(dirname "$0")/../.."
out=${1:-build/fuzz_header}
mkdir -p "$(dirname "$out")"
CC=${CC:-clang}
exec $CC -std=gnu11 -g -O1 -D_GNU_SOURCE -Isrc -fsanitize=fuzzer,address,undefined \
	-o "$out" tests/fuzz/fuzz_header.c \
	src/qcow2/header.c src/qcow2/snapshot.c src/common/util.c src/common/io.c src/common/io_mem.c \
	src/common/aio.c src/common/coro.c \
	-luring -lpthread
